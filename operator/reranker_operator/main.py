"""`reranker-operator`: run the operator in the foreground (Kubernetes supervises it).

A small wrapper over `kopf.run` so that the image's entry point needs no `kopf run FILE`:
it parses the few flags an operator deployment needs (namespaces, peering, liveness),
registers the handlers by importing them, and hands over to Kopf until SIGTERM.
Image and resync settings come from the environment (see `settings.OperatorConfig`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
from collections.abc import Sequence

import kopf

from reranker_operator import __version__
from reranker_operator.settings import OperatorConfig


class QuietEventHandlers(logging.Filter):
    """Drops Kopf's "Handler 'x' succeeded." for the per-event handlers (children's events,
    status churn): one line per watch event says nothing, and a fleet makes many."""

    NOISE = re.compile(r"^Handler '(\w+_changed|forget_deleted)' succeeded\.$")

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.NOISE.match(record.getMessage())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reranker-operator",
        description="Reconcile RerankerDeployment resources (reranker.dev/v1alpha1) into "
                    "reranking server fleets.")
    parser.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS",
        help="serve only this namespace (repeatable); "
             "default: all namespaces")
    parser.add_argument(
        "--peering", default=os.environ.get("RERANKER_OPERATOR_PEERING") or None,
        metavar="NAME",
        help="run as one of several replicas: only the highest-priority one acts (needs the "
             "Kopf peering CRDs, crds/kopf-peering.yaml); default: standalone "
             "[env RERANKER_OPERATOR_PEERING]")
    parser.add_argument(
        "--priority", type=int, default=None,
        help="peering priority (default: random, so replicas never tie)")
    parser.add_argument(
        "--liveness", default=os.environ.get("RERANKER_OPERATOR_LIVENESS",
                                             "http://0.0.0.0:8080/healthz"),
        metavar="URL",
        help="liveness endpoint to serve, or 'none' [env RERANKER_OPERATOR_LIVENESS]")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log more")
    verbosity.add_argument("--debug", action="store_true", help="log everything")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    kopf.configure(verbose=args.verbose, debug=args.debug, quiet=args.quiet)
    if not (args.verbose or args.debug):
        logging.getLogger("kopf.objects").addFilter(QuietEventHandlers())
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per probe otherwise
    import reranker_operator.handlers  # noqa: F401  (registers the handlers)

    standalone = args.peering is None
    priority = args.priority
    if not standalone and priority is None:
        priority = secrets.randbelow(2**31 - 1) + 1
    kopf.run(
        standalone=standalone,
        peering_name=args.peering,
        priority=priority,
        namespaces=args.namespace,
        clusterwide=not args.namespace,
        liveness_endpoint=None if args.liveness == "none" else args.liveness,
        memo=kopf.Memo(config=OperatorConfig.from_env()),
    )


if __name__ == "__main__":
    main()
