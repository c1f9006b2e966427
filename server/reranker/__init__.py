"""Reranker fleet: the reranking server.

Importing this package is cheap on purpose: torch and mlx are imported lazily inside the
backends, so the operator (which reads `reranker.contract`) never pulls them in.
"""

__version__ = "0.1.0"
