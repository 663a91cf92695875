"""`listenloop serve --replicas N`: the server's endpoints on Ray Serve, many replicas behind one
address (docs/SERVE.md, "Many replicas (Ray Serve)").

`ListenloopServer` is a Ray Serve deployment with FastAPI ingress: each replica loads one
Runtime and serves /v1/realtime, /v1/pcm and the browser page with the same Connection
classes as the aiohttp server, over a StarletteChannel (transport.py). Ray's proxy holds the
one address and its router places each new WebSocket on a replica, where it stays for its whole
life; `max_ongoing_requests` is the replica's session cap. `app_builder` is the application
builder that `serve run` and a config file name (docs/serve_config.yaml).

Only the command line's --replicas and Ray itself import this module: the single-process
server never imports Ray.
"""

# (No `from __future__ import annotations`: FastAPI reads the routes' annotations as types.)
import inspect
import json
import sys
import threading
import time

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

from ..errors import Error
from .app import STATIC_DIR, STOP_POLL_S, _static_file, api_key_from_env, check_bind, check_port, create_app
from .pcm import PcmConnection, _query_options
from .realtime import RealtimeConnection, beta_requested
from .state import ServerState, guard
from .transport import RequestView, StarletteChannel, error_body

APP_NAME = "listenloop"
# Autoscaling aims at this share of --max-sessions per replica, so that a new replica is
# loading before the others are full.
TARGET_LOAD = 0.75


# Everything the replica class uses is defined above it: Ray ships the class by value when it
# is declared.
LIMITS = {name: parameter.default for name, parameter in inspect.signature(create_app).parameters.items()
          if name in ("max_frame_bytes", "idle_timeout_s", "send_timeout_s")}  # defined once, there


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
                 allowed_origins=(), allowed_hosts=(), static_dir=None, **limits):
        from ..session import Runtime

        unknown = sorted(set(limits) - set(LIMITS))
        if unknown:
            raise Error(f"unknown replica option {unknown[0]!r}; known: {', '.join(LIMITS)}")
        self.runtime = Runtime(package, profile)
        self.state = ServerState(self.runtime, api_key=api_key_from_env(api_key_env),
                                 allowed_origins=tuple(allowed_origins), allowed_hosts=tuple(allowed_hosts),
                                 max_sessions=max_sessions, static_dir=static_dir or STATIC_DIR,
                                 **{**LIMITS, **limits})
        # What guard() reads as request.app. The key is imported here, in the replica: Ray ships
        # this class's methods by value, and a module-level name would arrive as a copy.
        from .state import STATE

        self.shared = {STATE: self.state}

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
        path = _static_file(self.state, name)
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

    def __del__(self):  # (Ray calls it when it stops the replica)
        runtime = getattr(self, "runtime", None)  # None when the model failed to load
        if runtime is not None:
            runtime.close()


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
          profile: str = "cpu", max_sessions: int = 8, **replica_args):
    """The Ray Serve application: `replicas` replicas, or autoscaling on open sessions per
    replica between `min_replicas` and `max_replicas` (starting at `replicas`); each replica
    holds at most `max_sessions` sessions. `replica_args` go to ListenloopServer."""
    check_replicas(replicas, min_replicas, max_replicas)
    if max_sessions < 1:
        raise Error(f"--max-sessions must be at least 1, got {max_sessions}")
    # max_queued_requests: new sessions that may wait at a proxy for a replica, one replica's
    # worth. Ray counts a session as waiting until it is placed, so a burst of new sessions
    # needs room here even when replicas are free; past it a session is refused before the
    # upgrade. Waiting sessions are also what autoscaling sees as demand beyond the caps.
    options = {"max_ongoing_requests": max_sessions, "max_queued_requests": max_sessions,
               "ray_actor_options": replica_resources(profile)}
    if min_replicas is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "initial_replicas": replicas,
                                         "max_replicas": max_replicas,
                                         "target_ongoing_requests": max(1.0, TARGET_LOAD * max_sessions)}
    return ListenloopServer.options(**options).bind(profile=profile, max_sessions=max_sessions, **replica_args)


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


def app_builder(args: BuildArgs):
    """The application builder for `serve run listenloop.server.cluster:app_builder` and the
    `import_path` of a config file."""
    return build(**args.model_dump())


def serve_replicas(host: str, port: int, replicas: int, min_replicas: int | None = None,
                   max_replicas: int | None = None, ray_address: str | None = None, *, package=None,
                   profile: str = "cpu", max_sessions: int = 8, api_key_env: str | None = None, allowed_origins=(),
                   allowed_hosts=(), stop: threading.Event | None = None) -> None:
    """Run the application on Ray (a local one started here unless `ray_address` names a
    running cluster) with its proxy on host:port, until `stop` is set; blocking. The
    application is deleted when it stops; a local Ray is shut down with it."""
    import ray

    check_port(port)
    check_bind(host, api_key_from_env(api_key_env))
    app = build(replicas, min_replicas, max_replicas, profile=profile, max_sessions=max_sessions, package=package,
                api_key_env=api_key_env, allowed_origins=tuple(allowed_origins),
                allowed_hosts=(*allowed_hosts, host))
    local = ray_address is None
    # "local": a new Ray of this command's own, even where RAY_ADDRESS names another
    ray.init(address="local" if local else ray_address, include_dashboard=False if local else None,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
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
    finally:
        try:
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()


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
