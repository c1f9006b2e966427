"""Registration: a server outside the cluster (an Apple-silicon Mac) joins a fleet's Service.

With RERANKER_REGISTER_DEPLOYMENT set, once the model is loaded and warm the server creates a
RerankerEndpoint (reranker.dev/v1alpha1) naming the RerankerDeployment it serves, its address
and port, backend and device, and a heartbeat. It renews the heartbeat every third of the
lease and deletes the object when it starts draining or stops, so the operator takes it out of
the Service at once; after a crash (no deletion) the operator drops it when the lease runs out,
and the next start takes the object over again.

A Mac drains like a pod: Kubernetes takes a pod out of its Service before the pod stops
listening (the preStop sleep), and kube-proxy meanwhile still sends it new connections. A Mac
has no kubelet doing that for it, so on SIGTERM it deletes its RerankerEndpoint first and keeps
accepting and serving (each answer closing its connection) until RERANKER_REGISTER_LEAVE_SECONDS
have passed since the deletion: time for the operator to rewrite the EndpointSlice and for
kube-proxy to stop sending it connections (`out_of_service`, which serve.py waits for before
its drain closes connections). Its identity may not read EndpointSlices (nothing beyond its own
RerankerEndpoint), so the wait is a bound, as a pod's preStop sleep is.

A server touches only what it registered. The default name carries the machine's identity
(HOSTNAME-MACHINE-PORT, MACHINE a hash of the hardware UUID or machine-id), so two Macs with
one host name never share an object; the object records that machine (annotation) and the
registering identity (spec.registeredBy, from a SelfSubjectReview); a takeover after a crash
happens only when both match, and renewals and the deletion carry the object's uid as a
precondition. The admission policy of deploy/mac/admission.yaml makes the API server enforce
the identity part: a ServiceAccount may create an endpoint only as itself, and renew or delete
only the ones it created.

The identity needs only a namespaced Role on rerankerendpoints (create, patch, delete; see
deploy/mac/rbac.yaml). Registration must never block or fail serving: the kubernetes client's
blocking calls run in a worker thread with a request timeout, every failure is logged and
retried with back-off, and a refusal (403) says which Role and verb are missing while the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import logging
import re
import socket
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from . import contract
from .backends import BackendInfo
from .settings import Settings

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
#: (connect, read) seconds of each API request: a hung API server cannot hold a thread long.
REQUEST_TIMEOUT = (3.0, 5.0)
#: How long shutdown waits for the deletion of the endpoint.
DEREGISTER_TIMEOUT = 5.0
#: How often a sleeping registration looks whether the server started draining.
DRAIN_POLL_SECONDS = 0.1
#: The Role a Mac's identity needs (the chart's macs.verbs grant these and get/update).
REQUIRED_VERBS = ("create", "patch", "delete")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


#: The machine that registered an endpoint (see `machine_id`): only it takes the object over.
ANNOTATION_MACHINE = f"{contract.API_GROUP}/machine-id"


def _hardware_id() -> bytes:
    """This machine's stable identity: the hardware UUID on macOS, /etc/machine-id on Linux,
    else the MAC address of a network interface."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
                                 capture_output=True, text=True, timeout=5).stdout
            if m := re.search(r'"IOPlatformUUID" = "([^"]+)"', out):
                return m.group(1).encode()
        except (OSError, subprocess.SubprocessError):
            pass
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            if value := Path(path).read_bytes().strip():
                return value
        except OSError:
            pass
    return uuid.getnode().to_bytes(6, "big")


def machine_id(hardware: bytes | None = None) -> str:
    """12 hex characters naming this machine: a hash, so the object shows no hardware id."""
    raw = _hardware_id() if hardware is None else hardware
    return hashlib.sha256(b"reranker-fleet machine\0" + raw).hexdigest()[:12]


def default_name(hostname: str, port: int, machine: str) -> str:
    """HOSTNAME-MACHINE-PORT as an object name (the short host name, lowercased, other chars
    to '-'): two Macs with one host name still get two names."""
    host = re.sub(r"[^a-z0-9-]+", "-", hostname.split(".")[0].lower()).strip("-") or "server"
    return f"{host[:43].strip('-')}-{machine}-{port}"


def endpoint_spec(*, deployment: str, address: str, port: int, info: BackendInfo | None,
                  lease_seconds: int, renew_time: str, registered_by: str | None = None
                  ) -> dict[str, Any]:
    """The RerankerEndpoint's spec (every key present: a takeover's merge patch clears the
    ones that are None). `registered_by`: the identity registering (the admission policy
    checks it is the caller's, and that only it renews or deletes the object)."""
    return {
        "deployment": deployment,
        "address": address,
        "port": port,
        "backend": info.backend if info else None,
        "device": info.device if info else None,
        "model": info.model if info else None,
        "registeredBy": registered_by,
        "heartbeat": {"renewTime": renew_time, "leaseDurationSeconds": lease_seconds},
    }


def endpoint_body(*, name: str, namespace: str, spec: dict[str, Any], machine: str | None
                  ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {
        "app.kubernetes.io/name": "reranker",
        "app.kubernetes.io/instance": spec["deployment"],
        "app.kubernetes.io/component": "external-endpoint",
        "app.kubernetes.io/part-of": "reranker-fleet"}}
    if machine is not None:
        meta["annotations"] = {ANNOTATION_MACHINE: machine}
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND_ENDPOINT,
        "metadata": meta,
        "spec": {k: v for k, v in spec.items() if v is not None},
    }


def ours(body: dict[str, Any], *, machine: str, user: str | None) -> bool:
    """Whether an existing RerankerEndpoint is this server's own (left by a crash of this
    machine under this identity): the only kind it takes over."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    if (meta.get("annotations") or {}).get(ANNOTATION_MACHINE) != machine:
        return False
    return user is None or spec.get("registeredBy") == user


class NotOurs(Exception):
    """The name is taken by another machine's or identity's RerankerEndpoint."""


def route_address(api_url: str) -> str:
    """This host's address on the route to the API server (no packet is sent)."""
    parsed = urllib.parse.urlparse(api_url)
    host, port = parsed.hostname or "localhost", parsed.port or 443
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return str(s.getsockname()[0])


def refusal_message(error: ApiException, *, verb: str, namespace: str) -> str:
    return (
        f"registration refused (403 Forbidden: {_reason(error)}). The kubeconfig's identity "
        f"needs a Role in namespace {namespace} allowing {', '.join(REQUIRED_VERBS)} on "
        f"rerankerendpoints.reranker.dev (here: {verb}), bound to it: kubectl apply -n "
        f"{namespace} -f deploy/mac/rbac.yaml, or the Helm chart's macs.enabled (docs/macs.md). "
        "The server keeps serving and retries.")


def _reason(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "").get("message") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason)


class Registration:
    """The RerankerEndpoint of this server: `start` once ready, `close` on shutdown."""

    def __init__(self, settings: Settings, *, info: BackendInfo | None,
                 draining: Callable[[], bool]) -> None:
        assert settings.register_deployment
        self.settings = settings
        self.deployment = settings.register_deployment
        self.info = info
        self.draining = draining
        self.port = settings.register_port or settings.port
        self.machine = settings.register_machine_id or machine_id()
        self.name = settings.register_name or default_name(socket.gethostname(), self.port,
                                                           self.machine)
        self.user: str | None = None  # this identity, as the API server sees it
        self.lease = settings.register_lease_seconds
        self.renew_every = self.lease / 3
        self.namespace = settings.register_namespace or "default"
        self.address = settings.register_address or ""
        self.registered = False  # the object exists as far as this server knows
        self._may_exist = False  # a create may have reached the API server: delete on close
        self.uid: str | None = None
        self._api: Any = None  # kubernetes.client.CustomObjectsApi, once connected
        self._task: asyncio.Task[None] | None = None
        self._leaving: asyncio.Task[None] | None = None
        self.leave_seconds = settings.register_leave_seconds
        self._left_at: float | None = None  # event-loop time the deletion ended (done or not)
        self._refused_logged = False

    @property
    def where(self) -> str:
        return f"RerankerEndpoint {self.namespace}/{self.name}"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registration")

    def out_of_service(self) -> bool:
        """Whether a draining server may stop accepting connections: no endpoint of it is (or
        may be) in the Service, or its deletion ended `leave_seconds` ago."""
        if self._leaving is None:
            return not (self.registered or self._may_exist) or self._api is None
        if self._left_at is None:
            return False
        return asyncio.get_running_loop().time() - self._left_at >= self.leave_seconds

    async def close(self) -> None:
        """Stop renewing and delete the endpoint (bounded: shutdown never waits long)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._deregister()

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await asyncio.to_thread(self._connect)
        except (kubernetes.config.ConfigException, OSError, ValueError, TypeError) as e:
            log.error("registration off: cannot use the kubeconfig %s: %s",
                      self.settings.register_kubeconfig or "($KUBECONFIG or ~/.kube/config)", e)
            return
        failures = 0
        while not self.draining():
            try:
                if self.registered:
                    await asyncio.to_thread(self._renew)
                else:
                    await asyncio.to_thread(self._register)
                failures = 0
                wait = self.renew_every
            except ApiException as e:
                failures += 1
                wait = self._backoff(failures)
                self._log_api_error(e, wait)
            except (HTTPError, OSError) as e:
                failures += 1
                wait = self._backoff(failures)
                log.warning("registration: API server unreachable (%s); retrying in %.0fs", e, wait)
            except NotOurs as e:
                failures += 1
                wait = self._backoff(failures)
                log.error("%s; retrying in %.0fs", e, wait)
            await self._sleep(wait)
        log.info("draining: deregistering")
        await self._deregister()

    def _backoff(self, failures: int) -> float:
        # Quick retries first, so a blip costs no lease; then at most every 60 s.
        return float(min(60.0, max(1.0, self.renew_every) * 2 ** min(failures - 1, 6)))

    async def _sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.draining() and (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(DRAIN_POLL_SECONDS, left))

    def _log_api_error(self, e: ApiException, wait: float) -> None:
        verb = "patch" if self.registered else "create"
        if e.status == 403:
            if not self._refused_logged:
                log.error("%s", refusal_message(e, verb=verb, namespace=self.namespace))
                self._refused_logged = True
            else:
                log.debug("registration still refused (403); retrying in %.0fs", wait)
        else:
            log.warning("registration: %s %s failed (%s %s); retrying in %.0fs", verb, self.where,
                        e.status, _reason(e), wait)

    # --- blocking calls (worker thread) -----------------------------------------------------

    def _connect(self) -> None:
        path = str(self.settings.register_kubeconfig) if self.settings.register_kubeconfig else None
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration)
        if not self.settings.register_namespace:
            _, active = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=path)
            self.namespace = (active or {}).get("context", {}).get("namespace") or "default"
        if not self.address:
            self.address = route_address(configuration.host)
        ip = ipaddress.ip_address(self.address)
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            log.warning("registration: address %s is not reachable from the cluster and an "
                        "EndpointSlice may not list it; set RERANKER_REGISTER_ADDRESS", self.address)
        client = kubernetes.client.ApiClient(configuration)
        self._api = kubernetes.client.CustomObjectsApi(client)
        self.user = self._whoami(client)

    def _whoami(self, client: kubernetes.client.ApiClient) -> str | None:
        """The caller's user name (a SelfSubjectReview, open to every authenticated identity),
        recorded in spec.registeredBy; None where the API server does not serve the review."""
        try:
            review = kubernetes.client.AuthenticationV1Api(client).create_self_subject_review(
                kubernetes.client.V1SelfSubjectReview(api_version="authentication.k8s.io/v1",
                                                      kind="SelfSubjectReview"),
                _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, HTTPError, OSError) as e:
            log.warning("registration: cannot tell who this identity is (%s); registering "
                        "without spec.registeredBy", e)
            return None
        user = review.status.user_info.username if review.status and review.status.user_info else None
        return str(user) if user else None

    def _spec(self) -> dict[str, Any]:
        return endpoint_spec(deployment=self.deployment, address=self.address, port=self.port,
                             info=self.info, lease_seconds=self.lease, renew_time=utc_now(),
                             registered_by=self.user)

    def _register(self) -> None:
        spec = self._spec()
        body = endpoint_body(name=self.name, namespace=self.namespace, spec=spec,
                             machine=self.machine)
        args = (contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL_ENDPOINT)
        self._may_exist = True
        try:
            result = self._api.create_namespaced_custom_object(
                *args, body, _request_timeout=REQUEST_TIMEOUT)
            how = "registered"
        except ApiException as e:
            if e.status != 409:
                self._may_exist = False
                raise
            # Left by an earlier run of this server (a crash): take it over, if it is ours.
            existing = self._api.get_namespaced_custom_object(
                *args, self.name, _request_timeout=REQUEST_TIMEOUT)
            if not ours(existing, machine=self.machine, user=self.user):
                self._may_exist = False
                found = (existing.get("metadata") or {}).get("annotations") or {}
                raise NotOurs(
                    f"{self.where} exists and was registered by another machine or identity "
                    f"(machine {found.get(ANNOTATION_MACHINE) or 'unknown'}, "
                    f"{(existing.get('spec') or {}).get('registeredBy') or 'unknown identity'}; "
                    f"this is machine {self.machine}, {self.user or 'unknown identity'}): not "
                    "taking it over. Give this server its own RERANKER_REGISTER_NAME, or delete "
                    "the object if it is a stale registration of this Mac") from None
            # The uid precondition: the object read above, not one that replaced it since.
            uid = existing["metadata"]["uid"]
            # registeredBy is immutable: an identity that cannot tell who it is keeps it.
            spec["registeredBy"] = (existing.get("spec") or {}).get("registeredBy")
            result = self._api.patch_namespaced_custom_object(
                *args, self.name, {"metadata": {"uid": uid, "labels": body["metadata"]["labels"]},
                                   "spec": spec},
                _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT)
            how = "registered (took over the existing object)"
        self.registered = True
        self.uid = (result or {}).get("metadata", {}).get("uid")
        log.info("%s as %s: %s:%d serves RerankerDeployment %s; heartbeat every %.1fs, lease %ds",
                 how, self.where, self.address, self.port, self.deployment, self.renew_every,
                 self.lease)

    def _renew(self) -> None:
        # The uid precondition: only the object this server created (or took over) is renewed,
        # never one that replaced it under the same name.
        patch: dict[str, Any] = {"spec": {"heartbeat": {"renewTime": utc_now(),
                                                        "leaseDurationSeconds": self.lease}}}
        if self.uid:
            patch["metadata"] = {"uid": self.uid}
        try:
            self._api.patch_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL_ENDPOINT,
                self.name, patch, _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as e:
            # 404: deleted; 422 on metadata.uid: replaced by another object of the same name
            # (the API server refuses a uid other than the stored one). Register again, which
            # takes over only an object of this machine and identity.
            if e.status == 404 or (e.status == 422 and "metadata.uid" in _reason(e)):
                log.warning("%s was %s; registering again", self.where,
                            "deleted" if e.status == 404 else "replaced by another object")
                self.registered = False
                self._register()
                return
            raise
        log.debug("renewed the heartbeat of %s", self.where)

    def _delete(self) -> None:
        options: dict[str, Any] = {"preconditions": {"uid": self.uid}} if self.uid else {}
        try:
            self._api.delete_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, self.namespace, contract.PLURAL_ENDPOINT,
                self.name, body=options, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as e:
            # 404: already gone; 409: the uid precondition failed (someone else's object now).
            if e.status not in (404, 409):
                raise
        self.registered = self._may_exist = False
        log.info("deregistered: %s deleted", self.where)

    async def _deregister(self) -> None:
        """Delete the endpoint once, whoever asks first (the drain or the shutdown): a second
        caller waits for the same deletion, and cancelling a caller does not cancel it."""
        if self._leaving is None:
            if not (self.registered or self._may_exist) or self._api is None:
                return
            self._leaving = asyncio.get_running_loop().create_task(self._leave())
        await asyncio.shield(self._leaving)

    async def _leave(self) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._delete), DEREGISTER_TIMEOUT)
        except (ApiException, HTTPError, OSError, asyncio.TimeoutError) as e:
            log.warning("could not deregister %s (%s): the operator drops it when its probes of "
                        "/ready (503 while draining) fail or its %ds lease runs out", self.where,
                        e, self.lease)
        finally:
            self._left_at = asyncio.get_running_loop().time()
        if self.draining():
            log.info("still accepting for %.1fs, while the Service lets go of this endpoint",
                     self.leave_seconds)
