"""RERANKER_E2E_REQUIRED=1 turns every skip of an end-to-end test into a failure.

The end-to-end tests skip where the machine cannot run them (not root, no node, the node held
by another cluster dir), which is right on a laptop and wrong in CI: there a green run must mean
they ran. `.ci/run` sets the variable; tests/e2e/conftest.py installs this hook for the tests
under tests/e2e, and a skip anywhere in them (a fixture's, a mark's, the test's own) fails with
its reason.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

ENV = "RERANKER_E2E_REQUIRED"


def required() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.skipped and required() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (f"skipped, but {ENV}=1 (the end-to-end tests must run here): "
                           f"{reason}")
    return report
