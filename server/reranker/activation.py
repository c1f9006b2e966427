"""Raw scores to relevance scores, in fp32 or wider.

Backends return raw scores (logits or cosine similarities) so that the cache holds one value
per pair and `raw_scores` costs nothing. A sigmoid computed in bf16 saturates at exactly 1.0
for logits above ~8; doing it here in float64 keeps high-scoring documents apart.
"""

from __future__ import annotations

import math


def apply(raw: float, activation: str) -> float:
    """sigmoid for cross-encoders (softmax positive class for two-label heads), identity for cosine."""
    if activation == "sigmoid":
        if raw >= 0:
            return 1.0 / (1.0 + math.exp(-raw))
        z = math.exp(raw)
        return z / (1.0 + z)
    return raw
