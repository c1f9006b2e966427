"""End-to-end tests on a real node (tests/kubecluster.py's `node_cluster`): images built by
`make images`, the chart's operator running as a pod, server pods serving through a Service.

Tests marked `own_node` bring up and tear down a node of their own, so they run first, before
the session's node exists (the node is one per machine).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "own_node: brings up a node of its own; runs before the session's node")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("own_node") is None)
