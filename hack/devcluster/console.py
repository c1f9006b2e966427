"""Progress and errors of hack/cluster: every line goes to stderr with one prefix.

stdout is kept for command output that scripts read (status JSON, paths, the env line).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def log(msg: str) -> None:
    print(f"[hack/cluster] {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1) -> NoReturn:
    log(f"ERROR: {msg}")
    sys.exit(code)


def verbose() -> bool:
    """RERANKER_CLUSTER_VERBOSE=1 prints the time of each start-up phase."""
    return bool(os.environ.get("RERANKER_CLUSTER_VERBOSE"))
