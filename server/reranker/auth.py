"""API keys: who may call the server, checked in constant time, and rotated without a restart.

Keys come from RERANKER_API_KEYS (fixed for the process' life) and RERANKER_API_KEYS_FILE.
In Kubernetes the file is a Secret volume: when the Secret changes, the kubelet swaps the
volume's `..data` link and the file shows the new keys. `ApiKeys` looks at the file again at
most every `RELOAD_SECONDS` (one `stat`) and re-reads it when it changed, so a rotation takes
effect within the kubelet's sync period plus a second, without rolling the pods.

Configured keys fail closed. A keys file that is missing, unreadable or holds no key (only
blank lines and comments) is a startup error (settings.py refuses it, naming the variable);
a file that becomes so during a rotation (a swap half done, a Secret emptied by mistake) keeps
the last good keys in force and logs an error at each look, and is never read as "no keys":
once keys are configured, only a request with one of them is accepted.

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
    """One key per line (or comma-separated, as RERANKER_API_KEYS); blank lines and lines starting
    with # are ignored."""
    return {key.strip() for line in text.splitlines() if not line.strip().startswith("#")
            for key in line.split(",") if key.strip()}


def read_keys_file(path: Path) -> frozenset[str]:
    """The keys in `path`; OSError/UnicodeDecodeError when it cannot be read, ValueError when it holds none."""
    keys = frozenset(parse_keys_file(path.read_text(encoding="utf-8")))
    if not keys:
        raise ValueError(f"{path} holds no API key (only blank lines or comments)")
    return keys


class ApiKeys:
    """The accepted keys and the check of a request's header. Authentication is on as soon as
    RERANKER_API_KEYS or RERANKER_API_KEYS_FILE is set, and stays on whatever the file does later."""

    def __init__(self, settings: Settings) -> None:
        self._fixed = frozenset(k.strip() for k in (settings.api_keys or "").split(",") if k.strip())
        self._file: Path | None = settings.api_keys_file
        self._from_file: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self._looked = 0.0
        self.enabled = bool(self._fixed) or self._file is not None
        if self._file is not None:
            self._stamp = self._stat(self._file)  # before the read: a swap in between is seen at the next look
            self._from_file = read_keys_file(self._file)
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
            keys = read_keys_file(self._file)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            # The stamp is not taken: the file is looked at (and this logged) again at the next reload.
            log.error("cannot use the API keys file %s (%s); the last good keys (%d) stay in force",
                      self._file, exc, len(self._fixed | self._from_file))
            return
        self._from_file, self._stamp = keys, stamp
        log.info("API keys file %s changed: %d keys in force", self._file, len(self._fixed | keys))

    @property
    def keys(self) -> frozenset[str]:
        self._refresh()
        return self._fixed | self._from_file

    def authorize(self, header: str | None) -> None:
        """Raise Unauthorized unless `header` is `Bearer KEY` with an accepted KEY (or no keys are configured)."""
        if not self.enabled:
            return  # no keys configured: any bearer token (the Cohere SDK always sends one) is accepted
        keys = self.keys  # never empty once enabled: a bad file keeps the last good keys
        scheme, _, token = (header or "").partition(" ")
        presented = token.strip().encode()
        matched = False
        for key in sorted(keys):  # every key, no early exit
            matched |= hmac.compare_digest(presented, key.encode())
        if scheme.lower() != "bearer" or not matched:
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>'")
