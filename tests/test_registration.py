"""Registration as an external endpoint, the parts that need no cluster: names, bodies,
settings, and that a registration that cannot work never stops the server from serving.

Registering against a real API server (success, takeover, deregistration, a refused identity)
is in tests/kube/test_external_endpoints.py.
"""

from __future__ import annotations

import asyncio
import logging
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from servers import running_app
from reranker import contract, registration
from reranker.registration import default_name, endpoint_body, endpoint_spec
from reranker.settings import Settings


MACHINE = "0a1b2c3d4e5f"


def test_default_name_is_a_valid_object_name() -> None:
    assert default_name("Studio-3.local", 8000, MACHINE) == "studio-3-0a1b2c3d4e5f-8000"
    assert default_name("MAC_MINI (2)", 8001, MACHINE) == "mac-mini-2-0a1b2c3d4e5f-8001"
    assert default_name("", 80, MACHINE) == "server-0a1b2c3d4e5f-80"
    name = default_name("x" * 100, 65535, MACHINE)
    assert len(name) <= 63 and name.endswith("-0a1b2c3d4e5f-65535")


def test_two_macs_with_one_hostname_get_two_names() -> None:
    """Two Macs both called "studio" must not fight over one RerankerEndpoint: the default
    name carries the machine's identity (a hash of its hardware UUID or machine-id)."""
    a = default_name("studio.local", 8000, registration.machine_id(b"hardware-uuid-A"))
    b = default_name("studio.local", 8000, registration.machine_id(b"hardware-uuid-B"))
    assert a != b and a.startswith("studio-") and b.startswith("studio-")
    # Stable for a machine (a restart takes its own object over), and no raw hardware id.
    assert registration.machine_id(b"hardware-uuid-A") == registration.machine_id(b"hardware-uuid-A")
    assert "hardware" not in a
    here = registration.machine_id()
    assert len(here) == 12 and here == registration.machine_id()


def test_a_mac_takes_over_only_what_it_registered() -> None:
    """After a crash the object is still there: the same machine under the same identity
    takes it over; anything else (another machine, another identity, an object that records
    neither) is left alone."""
    me = {"machine": MACHINE, "user": "system:serviceaccount:search:reranker-mac-studio"}

    def existing(machine: str | None, user: str | None) -> dict:
        body = endpoint_body(name="studio", namespace="search", spec=endpoint_spec(
            deployment="fleet", address="192.0.2.4", port=8000, info=None, lease_seconds=30,
            renew_time="t", registered_by=user), machine=machine)
        return body

    assert registration.ours(existing(MACHINE, me["user"]), **me)
    assert not registration.ours(existing("ffffffffffff", me["user"]), **me)
    assert not registration.ours(existing(MACHINE, "system:serviceaccount:search:other"), **me)
    assert not registration.ours(existing(None, None), **me)
    # Without an identity of its own (no SelfSubjectReview), the machine decides.
    assert registration.ours(existing(MACHINE, None), machine=MACHINE, user=None)


def test_body_names_the_deployment_and_drops_unknowns() -> None:
    spec = endpoint_spec(deployment="fleet", address="192.0.2.4", port=8000, info=None,
                         lease_seconds=30, renew_time="t")
    body = endpoint_body(name="mac", namespace="search", spec=spec, machine=MACHINE)
    assert body["metadata"]["annotations"] == {registration.ANNOTATION_MACHINE: MACHINE}
    assert body["apiVersion"] == f"{contract.API_GROUP}/{contract.API_VERSION}"
    assert body["kind"] == contract.KIND_ENDPOINT
    assert body["metadata"]["labels"]["app.kubernetes.io/instance"] == "fleet"
    assert body["spec"] == {"deployment": "fleet", "address": "192.0.2.4", "port": 8000,
                            "heartbeat": {"renewTime": "t", "leaseDurationSeconds": 30}}
    # A takeover's merge patch carries the None values, to clear what an older run set.
    assert spec["model"] is None


def test_registration_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(register_deployment="fleet", register_address=" 2001:db8::0001 ")
    assert s.register_address == "2001:db8::1" and s.register_lease_seconds == 30
    with pytest.raises(ValidationError, match="not an IPv4 or IPv6 address"):
        Settings(register_address="mac.local")
    with pytest.raises(ValidationError, match="not a Kubernetes object name"):
        Settings(register_name="Mac_1")
    with pytest.raises(ValidationError):
        Settings(register_lease_seconds=2)
    for name in ("RERANKER_REGISTER_DEPLOYMENT", "RERANKER_REGISTER_LEASE_SECONDS"):
        assert name in contract.ENV_VARS
    monkeypatch.setenv("RERANKER_REGISTER_DEPLOYMENT", "fleet")
    monkeypatch.setenv("RERANKER_REGISTER_PORT", "9000")
    s = Settings()
    assert (s.register_deployment, s.register_port) == ("fleet", 9000)


def test_the_leave_time_and_https_settings_are_checked(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """A draining Mac accepts for RERANKER_REGISTER_LEAVE_SECONDS after deregistering (5 s, as
    a pod's preStop sleep); HTTPS (a fleet with externalEndpoints.tls) needs a certificate and
    its key, both or neither."""
    for name in ("RERANKER_REGISTER_LEAVE_SECONDS", "RERANKER_TLS_CERTFILE",
                 "RERANKER_TLS_KEYFILE"):
        assert name in contract.ENV_VARS
    assert Settings().register_leave_seconds == 5.0
    with pytest.raises(ValidationError):
        Settings(register_leave_seconds=-1)
    with pytest.raises(ValidationError,
                       match="RERANKER_TLS_CERTFILE and RERANKER_TLS_KEYFILE go together"):
        Settings(tls_certfile=tmp_path / "mac.crt")
    monkeypatch.setenv("RERANKER_TLS_CERTFILE", str(tmp_path / "mac.crt"))
    monkeypatch.setenv("RERANKER_TLS_KEYFILE", str(tmp_path / "mac.key"))
    s = Settings()
    assert (s.tls_certfile, s.tls_keyfile) == (tmp_path / "mac.crt", tmp_path / "mac.key")


def test_route_address_is_this_hosts_address_toward_the_api_server() -> None:
    # The dev control plane listens on loopback, so the route to it starts at 127.0.0.1;
    # toward a real API server it is the Mac's LAN (or VPN) address.
    assert registration.route_address("https://127.0.0.1:6443") == "127.0.0.1"
    assert registration.route_address("https://localhost") in ("127.0.0.1", "::1")


async def test_an_unusable_kubeconfig_never_stops_serving(tiny_bert: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reranker.registration")
    async with running_app(model=str(tiny_bert), device="cpu", register_deployment="fleet",
                           register_kubeconfig=tmp_path / "missing.kubeconfig",
                           register_address="192.0.2.9") as client:
        assert (await client.get("/ready")).status_code == 200
        for _ in range(100):
            if "registration off" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "registration off: cannot use the kubeconfig" in caplog.text
        assert "missing.kubeconfig" in caplog.text
        r = await client.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert r.status_code == 200
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.registration is not None and not runtime.registration.registered
    # The shutdown did not wait on it either (nothing registered, nothing to delete).


# --- deploy/mac: the launchd job and the systemd unit -----------------------------------------

REPO = Path(__file__).resolve().parents[1]


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def test_the_launchd_job_runs_the_apple_silicon_profile_and_registers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    job = plistlib.loads((REPO / "deploy" / "mac" / "dev.reranker.server.plist").read_bytes())
    assert job["ProgramArguments"][1:] == ["serve"]
    assert job["ProgramArguments"][0].endswith("/.venv/bin/reranker")
    env = job["EnvironmentVariables"]
    assert set(env) - {"HF_HOME"} <= set(contract.ENV_VARS)
    profile = env_file(REPO / "config" / "apple_silicon.env")
    assert {k: env.get(k) for k in profile} == profile, "the plist drifted from the profile"
    assert env["RERANKER_REGISTER_DEPLOYMENT"] and env["RERANKER_REGISTER_KUBECONFIG"]
    # SIGKILL only after the drain; no restart after a clean stop (deregistered, drained).
    assert job["ExitTimeOut"] > int(env["RERANKER_DRAIN_SECONDS"])
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    for name in contract.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.device == "mlx" and settings.register_address == "192.168.1.20"


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (not a systemd host)")
    unit = (REPO / "deploy" / "mac" / "reranker@.service").read_text()
    assert "Environment=RERANKER_REGISTER_DEPLOYMENT=%i" in unit
    # The ExecStart binary must exist for `verify`: this checkout's.
    reranker = Path(sys.executable).parent / "reranker"
    (tmp_path / "reranker@.service").write_text(
        unit.replace("/opt/reranker-fleet/.venv/bin/reranker", str(reranker)))
    r = subprocess.run([analyze, "verify", "--man=no", "reranker@fleet.service"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
