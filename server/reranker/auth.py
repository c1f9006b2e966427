"""API keys: who may call the server, checked in constant time, and rotated without a restart.

Keys come from RERANKER_API_KEYS (fixed for the process' life) and RERANKER_API_KEYS_FILE.
In Kubernetes the file is a Secret volume: when the Secret changes, the kubelet swaps the
volume's `..data` link and the file shows the new keys. `ApiKeys` looks at the file again at
most every `RELOAD_SECONDS` (one `stat`) and re-reads it when it changed, so a rotation takes
effect within the kubelet's sync period plus a second, without rolling the pods. A file that
cannot be read mid-swap keeps the keys in force.

A presented key is compared with every configured key by `hmac.compare_digest`, without
stopping at a match: the time of the answer tells an attacker neither how much of a key was
right nor which key it was.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

from .errors import Unauthorized
from .settings import Settings

log = logging.getLogger(__name__)

#: How often the keys file is looked at again (seconds).
RELOAD_SECONDS = 1.0


def parse_keys_file(text: str) -> set[str]:
    """One key per line; blank lines and lines starting with # are ignored."""
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


class ApiKeys:
    """The accepted keys (empty: authentication off) and the check of a request's header."""

    def __init__(self, settings: Settings) -> None:
        self._fixed = frozenset(k.strip() for k in (settings.api_keys or "").split(",") if k.strip())
        self._file: Path | None = settings.api_keys_file
        self._from_file: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self._looked = 0.0
        if self._file is not None:
            self._from_file = frozenset(parse_keys_file(self._file.read_text(encoding="utf-8")))
            self._stamp = self._stat(self._file)
            self._looked = time.monotonic()

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int]:
        st = os.stat(path)  # follows the kubelet's symlinks to the current data
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._looked < RELOAD_SECONDS:
            return
        self._looked = now
        try:
            stamp = self._stat(self._file)
            if stamp == self._stamp:
                return
            keys = frozenset(parse_keys_file(self._file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the API keys file %s (%s); the current keys stay in force", self._file, exc)
            return
        self._from_file, self._stamp = keys, stamp
        log.info("API keys file %s changed: %d keys in force", self._file, len(self._fixed | keys))

    @property
    def keys(self) -> frozenset[str]:
        self._refresh()
        return self._fixed | self._from_file

    def authorize(self, header: str | None) -> None:
        """Raise Unauthorized unless `header` is `Bearer KEY` with an accepted KEY (or no keys are set)."""
        keys = self.keys
        if not keys:
            return  # no keys configured: any bearer token (the Cohere SDK always sends one) is accepted
        scheme, _, token = (header or "").partition(" ")
        presented = token.strip().encode()
        matched = False
        for key in sorted(keys):  # every key, no early exit
            matched |= hmac.compare_digest(presented, key.encode())
        if scheme.lower() != "bearer" or not matched:
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
