"""The static directory and the settings: fleets from JSON or a file (re-read on change, a bad
file keeps the fleets read before), `changed` wakes waiters, PORT works as Kubernetes sets it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from reranker.gateway.directory import Directory, Endpoint
from reranker.gateway.main import directory_for
from reranker.gateway.settings import GatewaySettings
from reranker.gateway.static import StaticDirectory, parse_fleets

FLEETS = [{"name": "minilm", "served_names": ["m", "alias"], "endpoints": ["http://10.0.0.1:8000/",
                                                                            {"url": "http://10.0.0.2:8000", "name": "mac-1"}]}]


def test_fleets_are_read_from_json() -> None:
    (fleet,) = parse_fleets(json.dumps(FLEETS))
    assert fleet.served_names == ("m", "alias") and fleet.replicas == 2 and not fleet.can_wake
    assert fleet.endpoints == (Endpoint(url="http://10.0.0.1:8000", name="10.0.0.1:8000"),
                               Endpoint(url="http://10.0.0.2:8000", name="mac-1"))
    for bad, message in [("{", "not JSON"), ("{}", "JSON list"), ('[{"served_names": []}]', "`name`"),
                         ('[{"name": "x", "endpoints": ["10.0.0.1:8000"]}]', "http")]:
        with pytest.raises(ValueError, match=message):
            parse_fleets(bad)


async def test_a_fleets_file_is_reread_and_changed_wakes_waiters(tmp_path: Path) -> None:
    path = tmp_path / "fleets.json"
    path.write_text(json.dumps([{**FLEETS[0], "endpoints": []}]))
    directory = StaticDirectory(str(path), reload_seconds=0.05)
    assert isinstance(directory, Directory)
    await directory.start()
    try:
        assert directory.fleets()[0].endpoints == ()
        waiter = asyncio.ensure_future(directory.changed())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        path.write_text(json.dumps(FLEETS))
        await asyncio.wait_for(waiter, 2)
        assert len(directory.fleets()[0].endpoints) == 2
        path.write_text("not json")  # a bad edit keeps what was read before
        await asyncio.sleep(0.2)
        assert len(directory.fleets()[0].endpoints) == 2
    finally:
        await directory.stop()


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("RERANKER_GATEWAY_FANOUT_THRESHOLD", "64")
    monkeypatch.setenv("RERANKER_GATEWAY_STATIC_FLEETS", json.dumps(FLEETS))
    settings = GatewaySettings()
    assert settings.port == 9001 and settings.fanout_threshold == 64 and settings.discovery == "static"
    assert directory_for(settings).fleets()[0].name == "minilm"
