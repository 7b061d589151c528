"""The dev cluster's Kubernetes API server: kmock's emulator with what a real server does added.

No real cluster can run here, so the operator (kopf), the pod executor, kubectl and the kubernetes
client all talk HTTP to this server. This module holds the request path (parse, route, read, create,
update, store and publish) and how to serve it; watches, deletion, CRDs, tables and faults are
mixins of their own modules. docs/dev-cluster.md lists everything it does and every difference
from kube-apiserver.

Entry points: ``serve()`` (async context manager), ``write_kubeconfig()``,
``KubeApiEmulator.register_crd()``, ``load_crds()`` and
``python -m kubetrain_devcluster.apiserver --host H --port P [--log-dir D] [--crd FILE ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import logging
import pathlib
import random
import re
import signal
import sys
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from kubetrain.contracts import accept_api_nesting

from .access import check_access, new_token, read_tokens, self_signed_tls, server_tls
from .crds import CrdMixin, load_crds, validate_crd
from .deletion import DeletionMixin, ready_to_remove
from .errors import REASONS, api_error, conflict, describe, invalid, not_found, status_body
from .faults import FAULTS_PATH, Fault, FaultsMixin
from .objects import Key, Obj, meta, now_rfc3339
from .patches import apply_patch, checked_object, merged_update
from .paths import guess_action, parse_api_path
from .schema import admit_custom, strict_fields
from .resources import CRD_RESOURCE, NAMESPACES, Target, api_version, apply_defaults, builtin_resources
from .selectors import request_selector
from .tables import TablesMixin, header, wants_table
from .watch import WatchMixin

log = logging.getLogger(__name__)

__all__ = ["FAULTS_PATH", "ApiServer", "KubeApiEmulator", "load_crds", "serve", "write_kubeconfig"]


@attrs.define(kw_only=True)
class KubeApiEmulator(WatchMixin, DeletionMixin, CrdMixin, TablesMixin, FaultsMixin, kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the semantics listed in docs/dev-cluster.md.

    Every write holds ``self._lock`` (kmock's) while it changes ``self.objects`` and puts its
    event on ``self._buses[resource]``, so a watcher that marks the bus under the lock misses
    nothing and sees nothing twice. Stored object dicts are never mutated in place: each write
    stores a new copy, so events and responses can share them.
    """

    tokens: Mapping[str, str] | None = None  # bearer token -> user (see access.py); None: open
    log_dir: pathlib.Path | None = attrs.field(default=None, converter=lambda p: None if p is None else pathlib.Path(p))
    audit_log: pathlib.Path | None = attrs.field(default=None, converter=lambda p: None if p is None else pathlib.Path(p))
    event_window: int = 10_000
    request_log_limit: int = 1_000
    history_limit: int = 20

    _rv: int = attrs.field(default=0, init=False)
    _events: dict[kmock.resource, deque[Obj]] = attrs.field(factory=dict, init=False)
    _expired_rv: dict[kmock.resource, int] = attrs.field(factory=lambda: defaultdict(int), init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)  # spent ones stay, so their hits stay readable
    _columns: dict[kmock.resource, list[Obj]] = attrs.field(factory=dict, init=False)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    # Indexes of the not-removed objects, kept by _store and _remove: a list or a GC check looks at its own
    # resource's keys (not at every object ever stored, events included), so hundreds of jobs stay fast.
    _live_keys: defaultdict[kmock.resource, set[Key]] = attrs.field(factory=lambda: defaultdict(set), init=False)
    _live_uids: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        # Only the scaffold's discovery routes: the emulator's own fallbacks would store objects
        # with kmock's simpler semantics, and resource requests never reach them here anyway.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self.fallback["get /healthz"] << b"ok"
        self.fallback["get /readyz"] << b"ok"
        for key, info in builtin_resources().items():
            self.resources[key] = info
        self._store((NAMESPACES, None, "default"), self._new_object(
            NAMESPACES, None, {"metadata": {"name": "default"}}))

    # -- kmock hooks ---------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Parse with ``parse_api_path`` (not kmock's), serve, and render every error as a Status.

        Writes are shielded: with handler cancellation on (so that a closed watch connection ends
        its handler), a client that hangs up mid-write must not leave a write half done.
        """
        try:
            user = check_access(raw_request, self.tokens)
            request = await self._parse(raw_request)
            if self.audit_log is not None:
                self._audit(raw_request, request, user)
            self._requests.append(request)
            del self._requests[: -self.request_log_limit]
            if raw_request.method == "GET":
                return await self._handle(request)
            return await asyncio.shield(self._handle(request))
        except kmock.KubernetesError as e:
            return await self._render_error(e)
        except Exception as e:
            log.exception("kubetrain apiserver: %s %s failed", raw_request.method, raw_request.path)
            if self._errors:
                self._errors[-1].append(e)
            return await self._render_error(e)

    def _audit(self, raw: aiohttp.web.BaseRequest, request: kmock.Request, user: str) -> None:
        """One JSON line per resource request: who (bearer token) did which RBAC verb on what.

        The dev cluster gives each component its own token, so a test can compare what the operator
        really does with what its ClusterRole grants (there is no authorization here to do it).
        """
        res = request.resource
        if res is None or res.plural is None:
            return
        named = request.name is not None
        verb = {"GET": "get" if named else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if named else "deletecollection"}.get(raw.method, raw.method.lower())
        if raw.method == "GET" and request.params.get("watch") in ("true", "1"):
            verb = "watch"
        entry = {"user": user, "verb": verb, "group": res.group or "", "resource": res.plural,
                 "subresource": request.subresource or "", "namespace": request.namespace or "", "name": request.name or ""}
        with open(self.audit_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if type(exc) is kmock.KubernetesError:  # ours: real reasons and messages
            body = status_body(exc.status, exc.message or "", exc.reason or "", exc.details)
            return aiohttp.web.json_response(body, status=exc.status)
        if isinstance(exc, kmock.KubernetesError):  # kmock's discovery 404s: give them real reasons
            reason = REASONS.get(exc.status, "InternalError")
            body = status_body(exc.status, "the server could not find the requested resource", reason)
            return aiohttp.web.json_response(body, status=exc.status)
        return aiohttp.web.json_response(status_body(500, repr(exc), "InternalError"), status=500)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path
        if path.rstrip("/") == FAULTS_PATH:
            return self._serve_faults(request)
        self._check_faults(request.method, path)
        if path == "/openapi/v3" or path.startswith("/openapi/v3/"):
            return self._serve_openapi(path)
        if request.resource is not None and request.resource.plural is not None:
            return await self._serve_resource(request)
        return await kmock.RawHandler._handle(self, request)  # discovery and kmock's DSL

    def _get_resources(self) -> list[kmock.resource]:
        """Only what is declared (kmock would also list the resources of stored objects)."""
        return list(self.resources)

    async def _serve_version(self, request: kmock.Request) -> Obj:
        """kmock's resource list, with the core group-version spelt ``v1`` and verbs per subresource."""
        body: Obj = await super()._serve_version(request)
        if body.get("groupVersion") == "/v1":
            body["groupVersion"] = "v1"
        for item in body["resources"]:
            sub = item["name"].partition("/")[2]
            if sub:  # no short names here, or kubectl warns that `tj` may mean trainingjobs/status
                item.update(shortNames=[], categories=[], singularName="",
                            verbs={"log": ["get"], "eviction": ["create"]}.get(sub, ["get", "patch", "update"]))
        return body

    async def _serve_server_version(self, request: kmock.Request) -> Obj:
        """The kubectl version this was verified with (kmock says k3s 1.26: kubectl would warn of skew)."""
        body: Obj = await super()._serve_server_version(request)
        return {**body, "major": "1", "minor": "32", "gitVersion": "v1.32.0-kubetrain-dev"}

    async def _parse(self, raw: aiohttp.web.BaseRequest) -> kmock.Request:
        """A kmock Request with the Kubernetes fields from ``parse_api_path``."""
        if raw.content_type == "application/vnd.kubernetes.protobuf":
            raise api_error(415, "protobuf bodies are not supported by this API server: send JSON "
                                 "(kubectl create -f / apply -f do; kubectl create namespace|configmap|... do not)")
        body = await raw.read()
        text = body.decode("utf-8", errors="replace")
        data: Any = None
        if body:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        api = parse_api_path(raw.path)
        params = dict(raw.query)
        if api is not None and api.watch:
            params["watch"] = "true"
        resource = None if api is None else api.resource
        return kmock.Request(
            id=len(self._requests), raw_request=raw, url=raw.url, method=raw.method, params=params,
            headers=dict(raw.headers), cookies=dict(raw.cookies), body=body, text=text, data=data,
            action=guess_action(raw.method, api, params), resource=resource,
            namespace=api.namespace if api else None, name=api.name if api else None,
            subresource=api.subresource if api else None)

    # -- routing -------------------------------------------------------------------------------

    async def _serve_resource(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Route a resource request by method, name and subresource, as the real server does."""
        t = self._target(request)
        method, sub = request.method.upper(), t.subresource
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self._serve_watch(request, t)
        if t.name is None:
            routes = {"GET": self._serve_list, "POST": self._serve_create, "DELETE": self._serve_delete_collection}
        elif sub == "log":
            routes = {"GET": self._serve_log}
        elif sub == "eviction":
            routes = {"POST": self._serve_eviction}
        elif sub in (None, "status"):
            routes = {"GET": self._serve_fetch, "PUT": self._serve_replace, "PATCH": self._serve_update}
            if sub is None:
                routes["DELETE"] = self._serve_delete
        else:
            routes = {}
        if method not in routes:
            raise api_error(405, "the server does not allow this method on the requested resource")
        return await routes[method](request, t)

    def _target(self, request: kmock.Request) -> Target:
        res = request.resource
        assert res is not None
        if res not in self.resources:
            raise api_error(404, "the server could not find the requested resource")
        info = self.resources[res]
        namespace = request.namespace
        if (namespace is not None and not info.namespaced) or (
                info.namespaced and namespace is None and request.name is not None):
            raise api_error(404, "the server could not find the requested resource")
        if request.subresource is not None and request.subresource not in info.subresources:
            raise api_error(404, "the server could not find the requested resource")
        return Target(res, info, namespace, request.name, request.subresource)

    # -- reads ---------------------------------------------------------------------------------

    def _get(self, key: Key) -> Obj | None:
        stored = self.objects[key] if key in self.objects else None
        return None if stored is None or stored.deleted else stored.raw

    def _require(self, t: Target) -> Obj:
        obj = self._get(t.key)
        if obj is None:
            raise not_found(t.res, t.key[2])
        return obj

    def _live(self, res: kmock.resource | None = None) -> Iterator[tuple[Key, Obj]]:
        """All stored, not removed objects (of one resource), in (namespace, name) order."""
        keys = sorted(set().union(*self._live_keys.values()) if res is None else self._live_keys.get(res, ()),
                      key=lambda k: (k[1] or "", k[2]))
        for key in keys:
            if (obj := self._get(key)) is not None:
                yield key, obj

    async def _serve_fetch(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        async with self._lock:
            obj = self._require(t)
        return self._respond(request, t, obj)

    async def _serve_list(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        match = request_selector(request.params, t.namespace)
        async with self._lock:
            items = [obj for _, obj in self._live(t.res) if match(obj)]
            rv = str(self._rv)
        if wants_table(request):
            return aiohttp.web.json_response(self._table(t, items, rv))
        return aiohttp.web.json_response(self._list_body(t, items, rv))

    def _list_body(self, t: Target, items: list[Obj], rv: str | None = None) -> Obj:
        return {"apiVersion": api_version(t.res), "kind": f"{t.info.kind}List",
                "metadata": {"resourceVersion": rv or str(self._rv)}, "items": items}

    def _respond(self, request: kmock.Request, t: Target, obj: Obj, status: int = 200) -> aiohttp.web.StreamResponse:
        if wants_table(request):
            return aiohttp.web.json_response(self._table(t, [obj], str(self._rv)), status=status)
        return aiohttp.web.json_response(obj, status=status)

    async def _serve_log(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        """The file the pod executor writes, ``<log_dir>/<namespace>/<name>_<uid>.log``."""
        async with self._lock:
            pod = self._require(t)
        if self.log_dir is None:
            raise api_error(404, "pod logs are not available: the API server was started without a log_dir")
        path = self.log_dir / str(t.namespace) / f"{t.name}_{meta(pod).get('uid')}.log"
        if not path.exists():
            raise api_error(400, f'container in pod "{t.name}" is waiting to start: no log yet')
        text = path.read_text(errors="replace")
        if (tail := request.params.get("tailLines")) is not None:
            if not tail.isdigit():
                raise api_error(400, f"tailLines must be a non-negative integer, not {tail!r}")
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) > 0 else ""
        return aiohttp.web.Response(text=text, content_type="text/plain")

    # -- writes: bookkeeping -------------------------------------------------------------------

    def _store(self, key: Key, obj: Obj) -> Obj:
        """Stamp the next resourceVersion on ``obj`` and store it as the key's newest version."""
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        if key in self.objects:
            history = self.objects[key].history
            history.append(obj)
            del history[: -self.history_limit]
        else:
            self.objects[key] = obj
        self._live_keys[key[0]].add(key)
        if uid := meta(obj).get("uid"):
            self._live_uids.add(uid)
        return obj

    async def _publish(self, res: kmock.resource, kind: str, obj: Obj, old: Obj | None = None) -> None:
        """Log the event for watch resumption and put it on the resource's bus (lock held)."""
        event = {"type": kind, "object": obj, "old": old, "rv": int(meta(obj)["resourceVersion"])}
        log_ = self._events.setdefault(res, deque(maxlen=self.event_window))
        if len(log_) == log_.maxlen:
            self._expired_rv[res] = log_[0]["rv"]
        log_.append(event)
        await self._buses[res].put(event)

    async def _commit(self, key: Key, obj: Obj, old: Obj | None) -> Obj:
        """Store a created or changed object, send ADDED/MODIFIED, react to CRDs (lock held)."""
        self._store(key, obj)
        await self._publish(key[0], "MODIFIED" if old is not None else "ADDED", obj, old)
        if key[0] == CRD_RESOURCE:
            self._declare_crd(obj, old)
        return obj

    async def _remove(self, key: Key, obj: Obj, *, cascade: bool = True) -> Obj:
        """Remove an object for good: DELETED (with a new resourceVersion), then GC (lock held)."""
        final = copy.deepcopy(obj)
        self._store(key, final)
        self.objects[key].delete()
        self._live_keys[key[0]].discard(key)
        self._live_uids.discard(meta(final).get("uid"))
        await self._publish(key[0], "DELETED", final)
        if key[0] == CRD_RESOURCE:
            await self._undeclare_crd(final)
        if cascade:
            self._background(self._collect_dependents(meta(final).get("uid")))
        return final

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- create --------------------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        body = checked_object(request.data)
        async with self._lock:
            obj = await self._create(t, copy.deepcopy(body), strict=strict_fields(request))
        return self._respond(request, t, obj, status=201)

    async def _create(self, t: Target, body: Obj, strict: bool = False) -> Obj:
        """Validate, name, stamp and store a new object (lock held)."""
        namespace = self._create_namespace(t, body)
        obj = self._admitted(t, self._new_object(t.res, namespace, body), strict)
        name = meta(obj)["name"]
        if t.res == CRD_RESOURCE:
            validate_crd(obj)
        if self._get((t.res, namespace, name)) is not None:
            raise api_error(409, f'{describe(t.res)} "{name}" already exists', reason="AlreadyExists",
                            name=name, group=t.res.group, kind=t.res.plural)
        created = await self._commit((t.res, namespace, name), obj, None)
        if meta(created).get("ownerReferences"):
            self._background(self._collect_if_orphaned((t.res, namespace, name)))
        return created

    def _create_namespace(self, t: Target, body: Obj) -> str | None:
        """The namespace from the URL; it must match the body's and exist, and not be terminating."""
        if not t.info.namespaced:
            return None
        if t.namespace is None:
            raise api_error(404, "the server could not find the requested resource")
        in_body = meta(body).get("namespace")
        if in_body and in_body != t.namespace:
            raise api_error(400, "the namespace of the provided object does not match "
                                 "the namespace sent on the request")
        namespace = self._get((NAMESPACES, None, t.namespace))
        if namespace is None:
            raise not_found(NAMESPACES, t.namespace)
        if meta(namespace).get("deletionTimestamp"):
            raise api_error(403, f"unable to create new content in namespace {t.namespace} "
                                 "because it is being terminated")
        return t.namespace

    def _new_object(self, res: kmock.resource, namespace: str | None, body: Obj) -> Obj:
        """The body with the metadata and defaults a real server adds on create."""
        info = self.resources[res]
        obj = {**body, "apiVersion": api_version(res), "kind": info.kind}
        md = obj["metadata"] = dict(meta(body))
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "uid"):
            md.pop(field, None)
        md["name"] = self._object_name(res, namespace, md, info.kind or "")
        if namespace is not None:
            md["namespace"] = namespace
        else:
            md.pop("namespace", None)
        md.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if "status" in info.subresources:
            obj.pop("status", None)
        apply_defaults(res, obj)
        return obj

    def _object_name(self, res: kmock.resource, namespace: str | None, meta: Obj, kind: str) -> str:
        name = meta.get("name")
        if not name and meta.get("generateName"):
            for _ in range(10):
                name = str(meta["generateName"])[:58] + "".join(random.choices(_NAME_ALPHABET, k=5))
                if self._get((res, namespace, name)) is None:
                    break
        if not name:
            raise invalid(kind, "", "metadata.name", "Required value: name or generateName is required")
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise invalid(kind, name, "metadata.name",
                           f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                           "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")
        return name

    # -- update --------------------------------------------------------------------------------

    async def _serve_update(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        content_type = header(request, "Content-Type").split(";")[0].strip().lower()
        async with self._lock:
            current = self._require(t)
            candidate = apply_patch(copy.deepcopy(current), content_type, request.data,
                                    strategic_ok=t.res.group in ("", "apiextensions.k8s.io",
                                                                 "coordination.k8s.io", "events.k8s.io"))
            obj = await self._update(t, current, candidate, strict=strict_fields(request))
        return self._respond(request, t, obj)

    async def _serve_replace(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        body = checked_object(request.data)
        if meta(body).get("name") not in (None, t.name):
            raise api_error(400, "the name of the object does not match the name on the URL")
        async with self._lock:
            current = self._require(t)
            obj = await self._update(t, current, copy.deepcopy(body), strict=strict_fields(request))
        return self._respond(request, t, obj)

    async def _update(self, t: Target, current: Obj, candidate: Obj, strict: bool = False) -> Obj:
        """Check, merge and store a PUT/PATCH result; remove the object if its finalizers are done."""
        wanted_rv = meta(candidate).get("resourceVersion")
        if wanted_rv and wanted_rv != meta(current)["resourceVersion"]:
            raise conflict(t.res, t.key[2], "the object has been modified; please apply your changes "
                                             "to the latest version and try again")
        new = self._admitted(t, merged_update(t, current, candidate), strict)
        if t.res == CRD_RESOURCE:
            validate_crd(new)
        if new == current:
            return current  # a no-op write: no new resourceVersion, no event
        await self._commit(t.key, new, current)
        if ready_to_remove(t.res, new):
            return await self._remove(t.key, new)
        return new

    def _admitted(self, t: Target, obj: Obj, strict: bool) -> Obj:
        """A custom resource as its CRD's schema admits it (schema.py); anything else as it is."""
        crd = None if t.res == CRD_RESOURCE else self._get((CRD_RESOURCE, None, f"{t.res.plural}.{t.res.group}"))
        return admit_custom(crd, t.res.version, obj, t.info.kind or "", t.res.group, strict)

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """End the watch streams and the background tasks (GC, namespace deletion)."""
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real server's: no vowels, no confusables


@dataclasses.dataclass(frozen=True)
class ApiServer:
    """A running server: its base URL (``http://host:port``) and the emulator, for assertions."""

    url: str
    host: str
    port: int
    emulator: KubeApiEmulator


@contextlib.asynccontextmanager
async def serve(host: str = "127.0.0.1", port: int = 0, *, log_dir: str | pathlib.Path | None = None,
                crds: Iterable[Mapping[str, Any] | str | pathlib.Path] = (),
                audit_log: str | pathlib.Path | None = None, tokens: Mapping[str, str] | None = None,
                tls: tuple[pathlib.Path, pathlib.Path] | None = None) -> AsyncIterator[ApiServer]:
    """Run the API server on ``host:port`` (0: a free port) while the context is open.

    ``crds`` are CRD dicts or YAML files, registered before the server listens; ``audit_log`` gets
    one JSON line per resource request (user, verb, resource); ``tokens`` (token -> user) are the bearer
    tokens it accepts (None: any request, for in-process tests); ``tls`` (certificate, key) serves https.
    """
    emulator = KubeApiEmulator(log_dir=log_dir, audit_log=audit_log, tokens=tokens)
    async with emulator:
        for crd in crds:
            for doc in load_crds([crd]) if isinstance(crd, (str, pathlib.Path)) else [crd]:
                await emulator.register_crd(doc)
        server = aiohttp.web.Server(emulator, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = aiohttp.web.TCPSite(runner, host, port, ssl_context=server_tls(*tls) if tls else None)
            await site.start()
            bound_port = runner.addresses[0][1]
            scheme = "https" if tls else "http"
            yield ApiServer(url=f"{scheme}://{host}:{bound_port}", host=host, port=bound_port, emulator=emulator)
        finally:
            await emulator.close()
            await runner.cleanup()


def write_kubeconfig(path: str | pathlib.Path, url: str, namespace: str = "default", token: str = "",
                     ca: pathlib.Path | None = None) -> pathlib.Path:
    """A kubeconfig for ``url`` that kubectl, kopf and the client accept: the server's bearer token (which
    also names the caller in the audit log) and, for https, the certificate to trust."""
    cluster: Obj = {"server": url}
    if ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(pathlib.Path(ca).read_bytes()).decode()
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "kubetrain-dev", "cluster": cluster}],
        "users": [{"name": "kubetrain-dev", "user": {"token": token}}],
        "contexts": [{"name": "kubetrain-dev",
                      "context": {"cluster": "kubetrain-dev", "user": "kubetrain-dev", "namespace": namespace}}],
        "current-context": "kubetrain-dev",
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)  # it holds a bearer token
    return path


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tokens = read_tokens(args.tokens_file) if args.tokens_file else {}
    admin = new_token("admin") if args.kubeconfig else None
    if admin:
        tokens[admin] = "admin"
    if args.tls_cert and args.tls_key:
        tls = (args.tls_cert, args.tls_key)
    else:  # kubectl sends no token over plain HTTP: made once, beside the kubeconfig or the tokens file
        tls = self_signed_tls((args.kubeconfig or args.tokens_file).resolve().parent / "tls")
    async with serve(args.host, args.port, log_dir=args.log_dir, crds=args.crd, audit_log=args.audit_log,
                     tokens=tokens, tls=tls) as server:
        if admin:
            write_kubeconfig(args.kubeconfig, server.url, token=admin, ca=tls[0])
        print(f"kubetrain apiserver listening on {server.url}", flush=True)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetrain_devcluster.apiserver",
                                     description="A Kubernetes API server for the dev cluster (kmock-based).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-dir", type=pathlib.Path, help="where the pod executor writes pod logs")
    parser.add_argument("--crd", action="append", default=[], metavar="FILE", help="CRD YAML to register (repeatable)")
    parser.add_argument("--audit-log", type=pathlib.Path, help="append one JSON line per resource request (user, verb, resource)")
    parser.add_argument("--kubeconfig", type=pathlib.Path, help="write a kubeconfig with a fresh random admin token here")
    parser.add_argument("--tokens-file", type=pathlib.Path, help="JSON {token: user} of the other accepted bearer tokens")
    parser.add_argument("--tls-cert", type=pathlib.Path, help="serve https with this certificate (default: a self-signed one)")
    parser.add_argument("--tls-key", type=pathlib.Path, help="... and this key")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not (args.kubeconfig or args.tokens_file):
        parser.error("bearer tokens are required: give --kubeconfig (an admin token is made) and/or --tokens-file")
    accept_api_nesting()  # store what kube-apiserver stores: JSON nested up to 10,000 levels
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
