"""`listenloop serve --replicas N`: the server's endpoints on Ray Serve, many replicas behind one
address (docs/SERVE.md, "Many replicas (Ray Serve)").

`ListenloopServer` is a Ray Serve deployment with FastAPI ingress: each replica loads one
Runtime and serves /v1/realtime, /v1/pcm and the browser page with the same Connection
classes as the aiohttp server, over a StarletteChannel (transport.py). Ray's proxy holds the
one address and its router places each new WebSocket on a replica, where it stays for its whole
life; `max_ongoing_requests` is the replica's session cap. Each replica answers /healthz and
/readyz for itself and counts the metrics of `listenloop serve` on Ray's metrics endpoint
(ray_metrics.py). `app_builder` is the application builder that `serve run` and a config file
name (docs/serve_config.yaml).

Stopping: Ray ends a replica once its sessions have ended, or `graceful_shutdown_timeout_s`
after it began to stop it, whichever is first; it tells the replica nothing before. So
`serve_replicas` first raises a `DrainNotice` (a named actor) that every replica follows: each
drains as `listenloop serve` does (drain.py) within --drain-timeout, closing what is left with
1001, before Ray's deadline.

Only the command line's --replicas and Ray itself import this module: the single-process
server never imports Ray.
"""

# (No `from __future__ import annotations`: FastAPI reads the routes' annotations as types.)
import asyncio
import json
import sys
import threading
import time

import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

from ..errors import Error
from .drain import CLOSE_TIMEOUT_S, DRAIN_TIMEOUT_S, STOP_POLL_S, check_drain_timeout, drain_sessions
from .pcm import PcmConnection, _query_options
from .realtime import RealtimeConnection, beta_requested
from .state import STATIC_DIR, ServerState, api_key_from_env, check_bind, check_port, guard, static_path
from .transport import RequestView, StarletteChannel, error_body

APP_NAME = "listenloop"
# Autoscaling aims at this share of --max-sessions per replica, so that a new replica is
# loading before the others are full.
TARGET_LOAD = 0.75
LIMITS = ("max_frame_bytes", "idle_timeout_s", "send_timeout_s")  # ServerState's, with its defaults
NOTICE_NAMESPACE = "listenloop"  # the Ray namespace of the applications' drain notices
# How often a replica sends Ray the metrics that are read when scraped (the model queue)
METRICS_REFRESH_S = 1.0
# Ray's own check for a stopping replica's open requests; its sessions are closed by the drain
SHUTDOWN_WAIT_LOOP_S = 0.5


# Everything the replica class uses is defined above it: Ray ships the class by value when it
# is declared.
def notice_name(app_name: str) -> str:
    """The name of the application's DrainNotice (in NOTICE_NAMESPACE)."""
    return f"{app_name}-drain"


def _refusal_body(response) -> dict:
    """The JSON body of guard()'s refusal (an aiohttp response)."""
    return json.loads(response.text)


api = FastAPI(title="listenloop", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class ListenloopServer:
    """One replica: one Runtime, its sessions and the checks of `listenloop serve`. The API key
    is read from the environment variable `api_key_env` where the replica runs."""

    def __init__(self, package=None, profile: str = "cpu", max_sessions: int = 8, api_key_env: str | None = None,
                 allowed_origins=(), allowed_hosts=(), static_dir=None, drain_timeout_s: float = DRAIN_TIMEOUT_S,
                 **limits):
        from ..session import Runtime
        from .ray_metrics import RayServerMetrics

        unknown = sorted(set(limits) - set(LIMITS))
        if unknown:
            raise Error(f"unknown replica option {unknown[0]!r}; known: {', '.join(LIMITS)}")
        check_drain_timeout(drain_timeout_s)
        self.drain_timeout_s = drain_timeout_s
        self.runtime = Runtime(package, profile)
        self.state = ServerState(self.runtime, api_key=api_key_from_env(api_key_env),
                                 allowed_origins=tuple(allowed_origins), allowed_hosts=tuple(allowed_hosts),
                                 max_sessions=max_sessions, static_dir=static_dir or STATIC_DIR,
                                 metrics=RayServerMetrics(self.runtime), **limits)
        # What guard() reads as request.app. The key is imported here, in the replica: Ray ships
        # this class's methods by value, and a module-level name would arrive as a copy.
        from .state import STATE

        self.shared = {STATE: self.state}
        # (Ray runs __init__ on the replica's event loop, where the sessions will run.)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._refresh_metrics()), loop.create_task(self._follow_drain_notice())]

    async def _refresh_metrics(self) -> None:
        while True:
            self.state.metrics.refresh()
            await asyncio.sleep(METRICS_REFRESH_S)

    async def _follow_drain_notice(self) -> None:
        """Drain when the application's DrainNotice says so; without one (an application that
        `serve run` or a config file started) Ray's own shutdown is all there is."""
        try:
            notice = ray.get_actor(notice_name(serve.get_replica_context().app_name), namespace=NOTICE_NAMESPACE)
        except ValueError:
            return
        try:
            await asyncio.wrap_future(notice.draining.remote().future())
        except ray.exceptions.RayActorError:  # the command ended without stopping (killed): Ray's shutdown only
            return
        hurry = notice.closing.remote().future()
        await drain_sessions(self.state, self.drain_timeout_s, hurry.done)

    @api.get("/healthz")
    async def healthz(self, request: Request):
        """200 while this replica and its event loop answer."""
        refusal = guard(RequestView(request, self.shared), counts=False, needs_key=False)
        if refusal is not None:
            return JSONResponse(_refusal_body(refusal), status_code=refusal.status)
        return JSONResponse({"status": "ok"})

    @api.get("/readyz")
    async def readyz(self, request: Request):
        """200 when this replica (its model is loaded once it answers) would admit one more
        session; else 503 with the reason, "full" or "draining"."""
        refusal = guard(RequestView(request, self.shared), counts=False, needs_key=False)
        if refusal is not None:
            return JSONResponse(_refusal_body(refusal), status_code=refusal.status)
        reason = self.state.not_ready()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    @api.websocket("/v1/realtime")
    async def realtime(self, websocket: WebSocket) -> None:
        channel = StarletteChannel(websocket, self.shared)
        if await self._admitted(channel, counts=True):
            await RealtimeConnection(channel, self.state, beta_requested(websocket.headers)).run()

    @api.websocket("/v1/pcm")
    async def pcm(self, websocket: WebSocket) -> None:
        channel = StarletteChannel(websocket, self.shared)
        try:
            rate, dtype, policy, tagged = _query_options(websocket.query_params)
        except (ValueError, Error) as exc:
            if await self._admitted(channel, counts=False):
                await channel.refuse(400, "invalid_option", str(exc))
            return
        if await self._admitted(channel, counts=True):
            await PcmConnection(channel, self.state, rate, dtype, policy, tagged).run()

    @api.get("/")
    async def index(self, request: Request):
        return self._static(request, "index.html")

    @api.get("/static/{name}")
    async def static_file(self, request: Request, name: str):
        return self._static(request, name)

    def _static(self, request: Request, name: str):
        refusal = guard(RequestView(request, self.shared), counts=False)
        if refusal is not None:
            return JSONResponse(_refusal_body(refusal), status_code=refusal.status)
        path = static_path(self.state, name)
        if path is None:
            return JSONResponse(error_body("not_found", "no such file"), status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def _admitted(self, channel: StarletteChannel, counts: bool) -> bool:
        """The checks of the aiohttp server's handlers (guard); a refusal is sent on `channel`."""
        refusal = guard(channel.request, counts=counts)
        if refusal is None:
            return True
        error = _refusal_body(refusal)["error"]
        await channel.refuse(refusal.status, error["code"], error["message"])
        return False

    def __del__(self):  # (Ray calls it when it stops the replica, once its sessions have ended)
        for task in getattr(self, "_tasks", ()):
            task.cancel()
        runtime = getattr(self, "runtime", None)  # None when the model failed to load
        if runtime is not None:
            runtime.close()


@ray.remote(num_cpus=0)
class DrainNotice:
    """Raised by `serve_replicas` when the command stops: `draining()` returns on every replica
    once `drain()` was called, `closing()` once `close_now()` was (a second Ctrl-C)."""

    def __init__(self):
        self._draining, self._closing = asyncio.Event(), asyncio.Event()

    async def draining(self) -> None:
        await self._draining.wait()

    async def closing(self) -> None:
        await self._closing.wait()

    async def drain(self) -> None:
        self._draining.set()

    async def close_now(self) -> None:
        self._draining.set()
        self._closing.set()


def replica_resources(profile: str) -> dict:
    """Ray resources of one replica: a GPU for the profiles that run the model on one."""
    from ..profiles import load_profile

    uses_gpu = load_profile(profile).primary.startswith(("CUDA", "Tensorrt", "TensorRT"))
    return {"num_cpus": 1, "num_gpus": 1} if uses_gpu else {"num_cpus": 1}


def check_replicas(replicas: int, min_replicas: int | None, max_replicas: int | None) -> None:
    if replicas < 1:
        raise Error(f"--replicas must be at least 1, got {replicas}")
    if (min_replicas is None) != (max_replicas is None):
        raise Error("--min-replicas and --max-replicas go together (autoscaling between them)")
    if min_replicas is not None and not 1 <= min_replicas <= replicas <= max_replicas:
        raise Error(f"autoscaling needs 1 <= --min-replicas <= --replicas <= --max-replicas, got {min_replicas}, "
                    f"{replicas}, {max_replicas}")


def build(replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None, *,
          profile: str = "cpu", max_sessions: int = 8, drain_timeout_s: float = DRAIN_TIMEOUT_S, **replica_args):
    """The Ray Serve application: `replicas` replicas, or autoscaling on open sessions per
    replica between `min_replicas` and `max_replicas` (starting at `replicas`); each replica
    holds at most `max_sessions` sessions. A replica that Ray stops is ended at the latest
    `drain_timeout_s` plus the time to close its sessions after it began (its sessions drain
    within `drain_timeout_s` when the application has a DrainNotice). `replica_args` go to
    ListenloopServer."""
    check_replicas(replicas, min_replicas, max_replicas)
    check_drain_timeout(drain_timeout_s)
    if max_sessions < 1:
        raise Error(f"--max-sessions must be at least 1, got {max_sessions}")
    # max_queued_requests: new sessions that may wait at a proxy for a replica, one replica's
    # worth. Ray counts a session as waiting until it is placed, so a burst of new sessions
    # needs room here even when replicas are free; past it a session is refused before the
    # upgrade. Waiting sessions are also what autoscaling sees as demand beyond the caps.
    options = {"max_ongoing_requests": max_sessions, "max_queued_requests": max_sessions,
               "ray_actor_options": replica_resources(profile),
               "graceful_shutdown_timeout_s": drain_timeout_s + 2 * CLOSE_TIMEOUT_S,
               "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_LOOP_S}
    if min_replicas is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "initial_replicas": replicas,
                                         "max_replicas": max_replicas,
                                         "target_ongoing_requests": max(1.0, TARGET_LOAD * max_sessions)}
    return ListenloopServer.options(**options).bind(profile=profile, max_sessions=max_sessions,
                                                    drain_timeout_s=drain_timeout_s, **replica_args)


class BuildArgs(BaseModel):
    """build()'s arguments as a config file's `args` or `serve run`'s key=value give them
    (Ray validates them against this model before calling app_builder)."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    package: str | None = None
    profile: str = "cpu"
    max_sessions: int = 8
    api_key_env: str | None = None
    allowed_origins: list[str] = []
    allowed_hosts: list[str] = []
    drain_timeout_s: float = DRAIN_TIMEOUT_S


def app_builder(args: BuildArgs):
    """The application builder for `serve run listenloop.server.cluster:app_builder` and the
    `import_path` of a config file."""
    return build(**args.model_dump())


def serve_replicas(host: str, port: int, replicas: int, min_replicas: int | None = None,
                   max_replicas: int | None = None, ray_address: str | None = None, *, package=None,
                   profile: str = "cpu", max_sessions: int = 8, api_key_env: str | None = None, allowed_origins=(),
                   allowed_hosts=(), stop: threading.Event | None = None, stop_now: threading.Event | None = None,
                   drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Run the application on Ray (a local one started here unless `ray_address` names a
    running cluster) with its proxy on host:port, until `stop` is set; blocking. Then the
    replicas drain (open sessions get `drain_timeout_s` to end, less if `stop_now` is set) and
    the application is deleted; a local Ray is shut down with it."""
    check_port(port)
    check_bind(host, api_key_from_env(api_key_env))
    app = build(replicas, min_replicas, max_replicas, profile=profile, max_sessions=max_sessions, package=package,
                api_key_env=api_key_env, allowed_origins=tuple(allowed_origins),
                allowed_hosts=(*allowed_hosts, host), drain_timeout_s=drain_timeout_s)
    local = ray_address is None
    # "local": a new Ray of this command's own, even where RAY_ADDRESS names another
    ray.init(address="local" if local else ray_address, include_dashboard=False if local else None,
             log_to_driver=False)
    deleted = False
    try:
        serve.start(http_options={"host": host, "port": port})
        notice = new_drain_notice(APP_NAME)  # before the replicas, which look for it as they start
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")  # returns once every replica has loaded its model
        except RuntimeError:
            raise Error(f"the replicas failed to start: {_deploy_failure()}") from None
        shown = f"[{host}]" if ":" in host else host
        print(f"listenloop: serving on http://{shown}:{port} (ws://{shown}:{port}/v1/realtime, /v1/pcm) through "
              f"Ray Serve, {_replicas_shown(replicas, min_replicas, max_replicas)}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        stop = stop or threading.Event()
        while not stop.is_set():
            time.sleep(STOP_POLL_S)
        print(f"listenloop: stopping; open sessions get up to {drain_timeout_s:g} s to end (a second Ctrl-C closes "
              "them now)", file=sys.stderr, flush=True)
        stop_application(APP_NAME, notice, stop_now)
        deleted = True
    finally:
        try:
            if not deleted:
                serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()


def new_drain_notice(app_name: str):
    """The DrainNotice of the application `app_name`, for its replicas to find as they start."""
    return DrainNotice.options(name=notice_name(app_name), namespace=NOTICE_NAMESPACE).remote()


def stop_application(app_name: str, notice, now: threading.Event | None = None) -> None:
    """Drain every replica of the application (its DrainNotice; `now` set cuts the drain
    short), then delete it: Ray waits for the sessions that the drain ends; blocking."""
    ray.get(notice.drain.remote())
    deleted = threading.Event()

    def hurry() -> None:
        while not deleted.is_set():
            if now.wait(STOP_POLL_S):
                notice.close_now.remote()
                return

    if now is not None:
        threading.Thread(target=hurry, name="listenloop-drain", daemon=True).start()
    try:
        serve.delete(app_name)
    finally:
        deleted.set()


def _deploy_failure() -> str:
    """The last line of what Ray reports for the failed deployment (the replica's error)."""
    app = serve.status().applications.get(APP_NAME)
    messages = [d.message for d in app.deployments.values() if d.message] if app is not None else []
    lines = [line for line in (messages[0] if messages else "see `serve status`").splitlines() if line.strip()]
    return lines[-1].strip()


def _replicas_shown(replicas, min_replicas, max_replicas) -> str:
    if min_replicas is None:
        return f"{replicas} replica{'s' if replicas > 1 else ''}"
    return f"{min_replicas} to {max_replicas} replicas (autoscaling, starting at {replicas})"
