"""pyproject.toml's optional dependencies as pip requirement files, one per extra: the
Dockerfile's dependency stages install from these, so their layers depend on pyproject.toml
alone, never on the sources.

An extra may name another extra of the project itself (`server` is
`reranker-fleet[openvino]` + torch + ...). pip would resolve such a line by fetching the
project from an index, where it is not, so a self-reference is replaced by the requirements
of the extras it names (recursively; a marker on the self-reference is kept on each of them).

    python3 extras.py pyproject.toml OUTDIR     writes OUTDIR/<extra>.txt for every extra

Standard library only: it runs on the image's bare Python before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# A PEP 508 requirement's name and extras, e.g. `reranker-fleet[openvino, gateway] ; marker`.
_HEAD = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$", re.S)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def expand(extras: dict[str, list[str]], *, project: str) -> dict[str, list[str]]:
    """Each extra's requirements with the project's own extras expanded in place (first
    occurrence kept, order kept). A self-reference to an unknown extra, or a cycle, fails."""

    def requirements(extra: str, stack: tuple[str, ...]) -> list[str]:
        if extra not in extras:
            raise SystemExit(f"{project}[{extra}] names no extra of pyproject.toml")
        if extra in stack:
            cycle = " -> ".join((*stack, extra))
            raise SystemExit(f"extras refer to each other in a cycle: {cycle}")
        out: list[str] = []
        for line in extras[extra]:
            m = _HEAD.match(line)
            if not m or _canonical(m.group(1)) != _canonical(project):
                out.append(line)
                continue
            rest = m.group(3).strip()
            if rest and not rest.startswith(";"):
                raise SystemExit(f"a reference to the project itself takes no version: {line!r}")
            marker = rest.removeprefix(";").strip()
            for name in filter(None, (e.strip() for e in (m.group(2) or "").split(","))):
                for req in requirements(name, (*stack, extra)):
                    out.append(_with_marker(req, marker) if marker else req)
        return list(dict.fromkeys(out))

    return {extra: requirements(extra, ()) for extra in extras}


def _with_marker(requirement: str, marker: str) -> str:
    spec, sep, own = requirement.partition(";")
    if sep:
        return f"{spec.strip()} ; ({own.strip()}) and ({marker})"
    return f"{spec.strip()} ; {marker}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    pyproject, outdir = Path(argv[0]), Path(argv[1])
    meta = tomllib.loads(pyproject.read_text())["project"]
    for extra, reqs in expand(meta.get("optional-dependencies", {}), project=meta["name"]).items():
        (outdir / f"{extra}.txt").write_text("\n".join(reqs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
