"""Nothing in the repository points outside it: a clone must carry every document a user needs.

Team notes that live beside the repository are not shipped; a file that refers to them leaves a
user with a dangling reference, so the contracts and the API are documented in docs/ instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = ".." + "/" + "shared"  # spelled in parts so that this file does not match itself


def test_no_file_points_outside_the_repository() -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    hits = []
    for name in filter(None, listed.decode().split("\0")):
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary files
        hits += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE in line]
    assert not hits, "files pointing outside the repository:\n" + "\n".join(hits)
