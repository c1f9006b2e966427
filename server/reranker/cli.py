"""`reranker` on the command line: `reranker serve [--flags]`.

The flags are generated from the settings class, so each one mirrors exactly one setting
and env var, and `reranker serve --help` documents them all. A flag wins over its env var.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from . import __version__
from .settings import Settings


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    choices = getattr(alias, "choices", None) or [field.upper()]
    return str(choices[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reranker", description="Reranking server: native, TEI, Cohere and Jina APIs.")
    parser.add_argument("--version", action="version", version=f"reranker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Run the HTTP server in the foreground.",
                           description="Run the HTTP server. Every flag can also be set by the env var shown.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in Settings.model_fields.items():
        default = field.default
        serve.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{field.description} [env {_env_name(name)}; default {default}]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        overrides = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            settings = Settings(**overrides)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                field = str(err["loc"][0]) if err["loc"] else "settings"
                env = _env_name(field) if field in Settings.model_fields else field
                print(f"reranker: invalid setting {env}: {err['msg']}", file=sys.stderr)
            return 2
        from .serve import run  # imports uvicorn and the app only when serving

        return run(settings)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
