"""A process in which torch and transformers cannot be imported: what the slim CPU image's server sees.

The venv has both (the tests' references need them), so a sitecustomize on PYTHONPATH puts a
meta-path finder first that raises ModuleNotFoundError for them: `import torch` fails in that
process exactly as where it is not installed. This stands in for the real thing, an image without
torch (tests/ship builds and runs that one), in tests that must run without a container runtime.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

SITECUSTOMIZE = textwrap.dedent('''
    import sys

    class HideTorch:
        """torch and transformers are not installed, as far as this process can tell."""
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden: the slim image has none)", name=name)
            return None

    sys.meta_path.insert(0, HideTorch())
''')


def env_without_torch(folder: Path) -> dict[str, str]:
    """Env vars for a subprocess that cannot import torch or transformers (`folder` holds the hook)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(folder)}
