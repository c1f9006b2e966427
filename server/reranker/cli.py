"""`reranker` on the command line: `reranker serve [--flags]` and `reranker convert [--flags]`.

The flags are generated from the settings class, so each one mirrors exactly one setting
and env var, and `reranker serve --help` documents them all. A flag wins over its env var.
`convert` takes the same flags (it must convert exactly what `serve` will look for) plus
`--termination-log`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    convert = sub.add_parser(
        "convert", help="Convert the model to OpenVINO IR and record its precision, then exit (needs PyTorch).",
        description="Convert the model `serve` would load to OpenVINO IR in RERANKER_MODEL_CACHE_DIR and measure "
        "(auto) or apply its precision, recording the decision there; print one JSON line. Takes serve's flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    convert.add_argument("--termination-log", dest="termination_log", type=Path, default=None, metavar="PATH",
                         help="Also write the JSON result (or {\"error\": ...}) to this file "
                         "(Kubernetes: /dev/termination-log)")
    for command in (serve, convert):
        for name, field in Settings.model_fields.items():
            default = field.default
            command.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
                                 metavar="VALUE", help=f"{field.description} [env {_env_name(name)}; default {default}]")
    return parser


def _settings(overrides: dict[str, Any]) -> Settings | None:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else "settings"
            env = _env_name(field) if field in Settings.model_fields else field
            print(f"reranker: invalid setting {env}: {err['msg']}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "termination_log")}
    settings = _settings(options)
    if settings is None:
        return 2
    if args.command == "serve":
        from .serve import run  # imports uvicorn and the app only when serving

        return run(settings)
    if args.command == "convert":
        from .convert import convert

        return convert(settings, termination_log=args.termination_log)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
