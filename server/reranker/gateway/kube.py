"""The gateway's Kubernetes directory: which fleets exist, what they serve, which endpoints are
ready, and how to wake one that was scaled to zero.

It keeps two informers' worth of state, each a list followed by a watch (the pattern of
client-go's reflector): the RerankerDeployments (names served from ``status.servedNames``, the
operator's record of the model id plus ``spec.model.servedNames``; ``spec.replicas``;
``spec.scaleToZero``) and the EndpointSlices of their Services (pods, and Macs through the
operator's own slices; ready endpoints only; each endpoint's port from its slice, since a Mac
may listen on another port than the pods). A watch resumes from the last resourceVersion it saw
after an error or the server closing it, lists again when the API server answers 410 Gone (the
version was compacted), and backs off while the API server cannot be reached; the fleets the
gateway knows meanwhile stay as they were, so a control-plane outage does not stop routing.

Waking a fleet is the gateway's half of the scale-to-zero contract with the operator: it first
sets the annotation ``reranker.dev/woken-at`` (RFC 3339) on the RerankerDeployment, which keeps
the operator from scaling the fleet to zero again within its idleSeconds, and then raises
``spec.replicas`` from 0 to 1 through the scale subresource, conditionally (the patch carries
the resourceVersion it read): a fleet another writer (the HPA, a user, the other gateway
replica) has already scaled is left alone.

Talks to the API server with httpx (async: a watch is cancelled with its task, no thread to
unblock); the ``kubernetes`` package only loads the configuration (in-cluster, else
``$KUBECONFIG`` / ``~/.kube/config``) and refreshes the bearer token it reads.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import os
import random
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import kubernetes

from .. import contract
from .directory import Endpoint, Fleet

log = logging.getLogger(__name__)

#: The annotation the operator reads before scaling an idle fleet to zero (OP-SCALE's side).
ANNOTATION_WOKEN_AT = f"{contract.API_GROUP}/woken-at"
#: EndpointSlices name their Service in this label (set by Kubernetes and by the operator).
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
#: The operator labels each fleet's Service (and so the slices Kubernetes copies the labels to)
#: and its own external endpoints' slices with this; the watch asks only for those.
SLICE_SELECTOR = f"app.kubernetes.io/name=reranker,{LABEL_SERVICE_NAME}"
#: The Service port's name the operator gives the server's port (pods and Macs).
PORT_NAME = "http"

RD_PATH = f"/apis/{contract.API_GROUP}/{contract.API_VERSION}"
SLICE_PATH = "/apis/discovery.k8s.io/v1"
MERGE_PATCH = "application/merge-patch+json"
#: Names the gateway in the API server's logs and in managedFields (the field manager).
USER_AGENT = "reranker-gateway"

#: Seconds a list or a patch may take; a watch's own read deadline is its timeoutSeconds + this.
REQUEST_TIMEOUT = 10.0
#: The API server ends each watch after a random 4-6 minutes (client-go's jitter), so that
#: every gateway replica does not re-watch at once.
WATCH_SECONDS = (240, 360)
#: Back-off after a failed list or watch: 0.5 s doubling to 30 s.
BACKOFF = (0.5, 30.0)
#: A wake of the same fleet within this many seconds of the last one is not sent again.
WAKE_INTERVAL_SECONDS = 2.0
#: Reads and conditional patches of the scale before a wake gives up (each 409 is a write
#: by someone else in between).
WAKE_ATTEMPTS = 3


class KubeSettings(Protocol):
    """What the directory reads of the gateway's settings."""

    @property
    def namespaces(self) -> Sequence[str] | str: ...


class ApiError(Exception):
    """The API server answered a request with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Gone(Exception):
    """The resourceVersion a watch asked for is too old (410): list again."""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


# --- pure: objects to fleets ----------------------------------------------------------------

Key = tuple[str, str]  # (namespace, name)


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def served_names(rd: Mapping[str, Any]) -> tuple[str, ...]:
    """The names a RerankerDeployment answers to: ``status.servedNames`` as the operator
    publishes it; before the operator has, the model id (else the folder the server loads,
    which is the name a server without an id reports) and the aliases of the spec."""
    published = (rd.get("status") or {}).get("servedNames")
    if published:
        return tuple(dict.fromkeys(str(n) for n in published))
    model = (rd.get("spec") or {}).get("model") or {}
    names: list[str] = []
    if model.get("id"):
        names.append(str(model["id"]))
    elif model.get("localPath"):
        names.append(str(model["localPath"]))
    elif model.get("pvc"):
        names.append("/models/" + str((model["pvc"] or {}).get("path") or "").lstrip("/"))
    names += [str(n) for n in model.get("servedNames") or ()]
    return tuple(dict.fromkeys(n for n in names if n))


def _url(address: str, port: int) -> str:
    try:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:  # an FQDN slice: not made by the operator, but valid
        host = address
    return f"http://{host}:{port}"


def slice_endpoints(endpoint_slice: Mapping[str, Any]) -> list[Endpoint]:
    """The ready endpoints of one EndpointSlice (a nil `ready` counts as ready, as the API
    documents; a terminating pod is never ready), at the slice's server port."""
    ports = endpoint_slice.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None and len(ports) == 1:
        port = ports[0].get("port")
    if not port:
        return []
    out = []
    for ep in endpoint_slice.get("endpoints") or ():
        if (ep.get("conditions") or {}).get("ready") is False:
            continue
        target = ep.get("targetRef") or {}
        for address in ep.get("addresses") or ():
            out.append(Endpoint(url=_url(str(address), int(port)),
                                name=str(target.get("name") or address)))
    return out


def build_fleets(rds: Iterable[Mapping[str, Any]],
                 slices: Iterable[Mapping[str, Any]]) -> tuple[Fleet, ...]:
    """Fleets from the RerankerDeployments and the EndpointSlices of their Services (a
    fleet's Service has the RerankerDeployment's name), sorted by namespace and name."""
    by_service: dict[Key, dict[str, Endpoint]] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        service = (meta.get("labels") or {}).get(LABEL_SERVICE_NAME)
        if not service:
            continue
        seen = by_service.setdefault((str(meta.get("namespace") or ""), str(service)), {})
        for ep in slice_endpoints(s):
            seen.setdefault(ep.url, ep)
    fleets = []
    for rd in rds:
        if (rd.get("metadata") or {}).get("deletionTimestamp"):
            continue
        key = _key(rd)
        spec = rd.get("spec") or {}
        endpoints = by_service.get(key, {})
        fleets.append(Fleet(
            namespace=key[0], name=key[1], served_names=served_names(rd),
            endpoints=tuple(endpoints[url] for url in sorted(endpoints)),
            replicas=int(spec.get("replicas", 1)),
            can_wake=bool(spec.get("scaleToZero"))))
    return tuple(sorted(fleets, key=lambda f: (f.namespace, f.name)))


# --- the API connection ---------------------------------------------------------------------

@dataclass
class _Connection:
    client: httpx.AsyncClient
    config: Any  # kubernetes.client.Configuration: refreshes the token it read

    async def headers(self) -> dict[str, str]:
        # auth_settings() runs the configuration's refresh hook: the in-cluster loader reads
        # the rotated ServiceAccount token file, a kubeconfig's exec plugin runs again.
        auth = await asyncio.to_thread(self.config.auth_settings)
        return {a["key"]: a["value"] for a in auth.values()
                if a.get("in") == "header" and a.get("value")}


def connect() -> _Connection:
    """The API server's address and credentials: in-cluster (the pod's ServiceAccount), else
    the kubeconfig ($KUBECONFIG or ~/.kube/config). Blocking (files, perhaps an exec plugin):
    call it in a thread."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=config)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG as it is now (the package read it once, at import)
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=config)
    verify: ssl.SSLContext | bool = False
    if config.verify_ssl:
        verify = ssl.create_default_context(cafile=config.ssl_ca_cert)
        if config.cert_file:
            verify.load_cert_chain(config.cert_file, config.key_file)
    elif config.cert_file:
        verify = ssl.create_default_context()
        verify.check_hostname, verify.verify_mode = False, ssl.CERT_NONE
        verify.load_cert_chain(config.cert_file, config.key_file)
    client = httpx.AsyncClient(base_url=config.host, verify=verify,
                               timeout=httpx.Timeout(REQUEST_TIMEOUT),
                               headers={"User-Agent": USER_AGENT})
    return _Connection(client=client, config=config)


def _error(r: httpx.Response) -> ApiError:
    try:
        message = str(r.json().get("message") or r.text)
    except ValueError:
        message = r.text
    return ApiError(r.status_code, message[:500])


# --- the directory --------------------------------------------------------------------------

class _Informer:
    """One list + watch of one resource in one scope (a namespace, or the cluster): its
    objects by (namespace, name), kept current until cancelled."""

    def __init__(self, conn: _Connection, *, what: str, path: str, selector: str | None,
                 on_change: Callable[[], None]) -> None:
        self.conn, self.what, self.path = conn, what, path
        self.params = {"labelSelector": selector} if selector else {}
        self.on_change = on_change
        self.objects: dict[Key, Mapping[str, Any]] = {}
        self.synced = asyncio.Event()
        self.lists = 0  # how many times it listed (the first, and once per 410 or failure)

    async def run(self) -> None:
        version: str | None = None
        failures = 0
        while True:
            try:
                if version is None:
                    version = await self._list()
                version = await self._watch(version)
                failures = 0
            except Gone:
                log.info("watch of %s: resourceVersion too old (410); listing again", self.what)
                version = None
            except (ApiError, httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                failures += 1
                pause = min(BACKOFF[1], BACKOFF[0] * 2 ** min(failures - 1, 8))
                hint = ""
                if isinstance(e, ApiError) and e.status in (401, 403):
                    hint = (" (the gateway's ServiceAccount needs get/list/watch on "
                            "rerankerdeployments and endpointslices: the chart's gateway RBAC)")
                log.warning("watch of %s failed (%s: %s)%s; again in %.1fs", self.what,
                            type(e).__name__, e, hint, pause)
                await asyncio.sleep(pause)

    async def _list(self) -> str:
        items: dict[Key, Mapping[str, Any]] = {}
        params: dict[str, Any] = {**self.params, "limit": 500}
        while True:
            r = await self.conn.client.get(self.path, params=params,
                                           headers=await self.conn.headers())
            if r.status_code != 200:
                raise _error(r)
            body = r.json()
            for obj in body.get("items") or ():
                items[_key(obj)] = obj
            meta = body.get("metadata") or {}
            if not meta.get("continue"):
                break
            params["continue"] = meta["continue"]
        self.objects = items
        self.lists += 1
        self.synced.set()
        self.on_change()
        return str(meta["resourceVersion"])

    async def _watch(self, version: str) -> str:
        """Follow the watch from `version` until the server ends it; the last version seen."""
        seconds = random.randint(*WATCH_SECONDS)
        params: dict[str, str | int] = {
            **self.params, "watch": "true", "resourceVersion": version,
            "allowWatchBookmarks": "true", "timeoutSeconds": seconds}
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=seconds + REQUEST_TIMEOUT)
        async with self.conn.client.stream("GET", self.path, params=params, timeout=timeout,
                                           headers=await self.conn.headers()) as r:
            if r.status_code == 410:
                raise Gone()
            if r.status_code != 200:
                await r.aread()
                raise _error(r)
            async for line in r.aiter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ApiError(int(obj.get("code") or 500), str(obj.get("message")))
                version = str(obj["metadata"]["resourceVersion"])
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self.objects.pop(_key(obj), None)
                else:
                    self.objects[_key(obj)] = obj
                self.on_change()
        return version


class KubeDirectory:
    """Fleets from the RerankerDeployments the gateway may see (``namespaces``: those
    namespaces, each its own list and watch, as a namespaced Role allows; empty: the whole
    cluster) and the EndpointSlices of their Services."""

    def __init__(self, settings: KubeSettings, *,
                 start_timeout: float = 30.0,
                 connector: Callable[[], _Connection] = connect) -> None:
        raw = settings.namespaces
        names = raw.split(",") if isinstance(raw, str) else list(raw)
        self.namespaces = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        self.start_timeout = start_timeout
        self._connector = connector
        self._conn: _Connection | None = None
        self._informers: list[_Informer] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._fleets: tuple[Fleet, ...] = ()
        self._changed = asyncio.Event()
        self._wakes: dict[Key, asyncio.Task[None]] = {}
        self._woken_at: dict[Key, float] = {}

    # --- Directory ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start the watches; returns once every first list is in (fleets() is
        complete), or after start_timeout with a warning while the watches keep trying."""
        self._conn = await asyncio.to_thread(self._connector)
        scopes: list[str | None] = list(self.namespaces) or [None]
        for ns in scopes:
            where = f"/namespaces/{ns}" if ns else ""
            in_ns = f" in {ns}" if ns else " (all namespaces)"
            self._informers += [
                _Informer(self._conn, what=f"{contract.PLURAL_DEPLOYMENT}{in_ns}",
                          path=f"{RD_PATH}{where}/{contract.PLURAL_DEPLOYMENT}", selector=None,
                          on_change=self._rebuild),
                _Informer(self._conn, what=f"endpointslices{in_ns}",
                          path=f"{SLICE_PATH}{where}/endpointslices", selector=SLICE_SELECTOR,
                          on_change=self._rebuild)]
        self._tasks = [asyncio.create_task(i.run(), name=f"watch {i.what}")
                       for i in self._informers]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(i.synced.wait() for i in self._informers)),
                self.start_timeout)
        except asyncio.TimeoutError:
            log.warning("the Kubernetes directory has not listed everything after %.0fs; "
                        "serving what it has while the watches keep trying", self.start_timeout)

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._wakes.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._wakes = [], {}
        if self._conn is not None:
            await self._conn.client.aclose()
            self._conn = None

    def fleets(self) -> tuple[Fleet, ...]:
        return self._fleets

    async def changed(self) -> None:
        await self._changed.wait()

    async def wake(self, fleet: Fleet) -> None:
        """Ask for one replica of `fleet`: mark it woken, then 0 -> 1 through the scale
        subresource. Concurrent calls for one fleet share one attempt, and a fleet woken in
        the last WAKE_INTERVAL_SECONDS is not patched again. Failures are logged (the held
        requests then time out with 503 and Retry-After), never raised."""
        key = (fleet.namespace, fleet.name)
        loop = asyncio.get_running_loop()
        if (task := self._wakes.get(key)) is None:
            if loop.time() - self._woken_at.get(key, -1e9) < WAKE_INTERVAL_SECONDS:
                return
            self._woken_at[key] = loop.time()
            task = self._wakes[key] = asyncio.create_task(self._wake(key),
                                                          name=f"wake {key[0]}/{key[1]}")
            task.add_done_callback(lambda _: self._wakes.pop(key, None))
        await asyncio.shield(task)

    # --- internals ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return bool(self._informers) and all(i.synced.is_set() for i in self._informers)

    def _rebuild(self) -> None:
        rds = [o for i in self._informers if i.path.endswith(contract.PLURAL_DEPLOYMENT)
               for o in i.objects.values()]
        slices = [o for i in self._informers if i.path.endswith("endpointslices")
                  for o in i.objects.values()]
        fleets = build_fleets(rds, slices)
        if fleets != self._fleets:
            self._fleets = fleets
            # wake every waiter of this change; later waiters wait for the next one
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wake(self, key: Key) -> None:
        namespace, name = key
        conn = self._conn
        if conn is None:
            return
        path = f"{RD_PATH}/namespaces/{namespace}/{contract.PLURAL_DEPLOYMENT}/{name}"
        annotation = {"metadata": {"annotations": {ANNOTATION_WOKEN_AT: now_rfc3339()}}}
        try:
            await self._patch(conn, path, annotation)
            for _ in range(WAKE_ATTEMPTS):
                r = await conn.client.get(f"{path}/scale", headers=await conn.headers())
                if r.status_code != 200:
                    raise _error(r)
                scale = r.json()
                # Scale's spec.replicas is omitted when 0
                if int((scale.get("spec") or {}).get("replicas") or 0) > 0:
                    log.info("wake %s/%s: already scaled up", namespace, name)
                    return
                # 0 -> 1 only: the resourceVersion makes the patch conditional (409 if the
                # scale changed since the read: read again).
                try:
                    await self._patch(conn, f"{path}/scale", {
                        "metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]},
                        "spec": {"replicas": 1}})
                except ApiError as e:
                    if e.status == 409:
                        continue
                    raise
                log.info("woke %s/%s: replicas 0 -> 1", namespace, name)
                return
        except ApiError as e:
            hint = (" (the gateway's ServiceAccount needs patch on rerankerdeployments and "
                    "rerankerdeployments/scale)" if e.status == 403 else "")
            log.error("wake %s/%s failed: %s%s", namespace, name, e, hint)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.error("wake %s/%s failed: %s: %s", namespace, name, type(e).__name__, e)

    @staticmethod
    async def _patch(conn: _Connection, path: str, patch: Mapping[str, Any]) -> None:
        r = await conn.client.patch(path, content=json.dumps(patch),
                                    headers={**await conn.headers(), "Content-Type": MERGE_PATCH})
        if r.status_code != 200:
            raise _error(r)
