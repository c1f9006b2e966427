"""A process in which torch and transformers cannot be imported: what the slim CPU image's server sees.

The venv has both (the tests' references need them), so a sitecustomize on PYTHONPATH wraps every
meta-path finder so that none finds them: `import torch` raises ModuleNotFoundError and
`importlib.util.find_spec("torch")` answers None in that process, exactly as where they are not
installed (nncf, for one, asks find_spec before importing torch). This stands in for the real thing, an image without
torch (tests/ship builds and runs that one), in tests that must run without a container runtime.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

SITECUSTOMIZE = textwrap.dedent('''
    import sys

    HIDDEN = ("torch", "transformers")


    class Hiding:
        """A meta-path finder that finds nothing of torch or transformers, and the rest as `finder` does."""

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None  # as if not installed: `import torch` fails, importlib.util.find_spec answers None
            find = getattr(self.finder, "find_spec", None)
            return None if find is None else find(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.finder, attribute)


    sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
''')


def env_without_torch(folder: Path) -> dict[str, str]:
    """Env vars for a subprocess that cannot import torch or transformers (`folder` holds the hook)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(folder)}
