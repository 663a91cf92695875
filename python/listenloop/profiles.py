"""Device profiles (runtime/profiles/*.json): which ONNX Runtime providers and options to use.

A profile names providers in order of preference. Providers this onnxruntime build does not
offer are dropped with a logged warning; when none of the accelerated ones is left the
profile runs on CPU. The engine also runs a start-up self-test and calls `cpu_fallback` if
the chosen provider fails on a real call.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .context import MAX_POSITIONS
from .errors import Bounds, DeviceError, show

log = logging.getLogger("listenloop")

CPU = "CPUExecutionProvider"
_EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
CONTEXT = Bounds(1, MAX_POSITIONS, integer=True)
SLOTS = Bounds(1, 4096, integer=True)


GRAPHS = ("encoder", "decoder")


@dataclass(frozen=True)
class Profile:
    name: str
    providers: tuple  # ((provider name, options dict), ...) in order of preference
    session: dict = field(default_factory=dict)
    kv_cache_device: str = "cpu"  # "cpu" or "cuda"
    max_context: int | None = None
    description: str = ""
    # Per-graph provider lists that replace `providers` for that graph, e.g. TensorRT for the
    # encoder's fixed shapes while the decoder, whose shapes change every step, runs on CUDA.
    graph_providers: dict = field(default_factory=dict)
    # Streams that share one decoder call (docs/DESIGN.md, "Fixed-slot batching"): the KV
    # caches of up to `slots` streams in one buffer, all their steps in one call of the
    # package's slot decoder. None: one stream per call.
    slots: int | None = None

    @property
    def primary(self) -> str:
        """The decoder's first provider: the one that decides where the KV cache lives."""
        return self.providers_for("decoder")[0][0]

    def providers_for(self, graph: str) -> tuple:
        return self.graph_providers.get(graph, self.providers)


def profiles_dir() -> Path:
    import listenloop.runtime as runtime_data

    return Path(runtime_data.__file__).parent / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.json"))


def profile_help() -> str:
    """The --profile help of every command."""
    return f"{', '.join(available_profiles())} or a profile .json (default: cpu)"


def physical_cores() -> int:
    """Physical cores (not hyper-threads): ORT's intra-op pool scales badly on siblings."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return n
    except ImportError:
        pass
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(cores) or affinity, affinity))


def available_memory() -> int | None:
    """Bytes of host memory a new allocation can take now (None when unknown): psutil's
    `available` (or /proc/meminfo's MemAvailable, or free pages), capped by a cgroup v2
    memory limit when the process runs in one (less what the cgroup uses, page cache that can
    be reclaimed not counted as used)."""
    available = None
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unable to read this system
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            pass
        if available is None:
            try:
                available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, ValueError, OSError):
                return None
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            for line in (cgroup / "memory.stat").read_text().splitlines():
                if line.startswith("inactive_file "):
                    used -= int(line.split()[1])
            available = min(available, max(0, int(limit) - max(0, used)))
    except (OSError, ValueError):
        pass
    return available


# Ranges and choices of a profile's fields (runtime/PACKAGE_FORMAT.md, "Ranges").
THREADS = Bounds(0, 256, integer=True)  # 0: ONNX Runtime's default
DEVICE_ID = Bounds(0, 255, integer=True)
_SESSION_FIELDS = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level",
                   "config_entries")
_MAX_CONFIG_KEY = 1024  # ONNX Runtime refuses longer session config keys


class _Invalid(Exception):
    """A problem in a profile: the field (None for the whole file) and what is wrong."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)


def _string(value, field: str, *, choices=None, optional=False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Invalid(field, f"must be a string, got {show(value)}")
    if choices is not None and value not in choices:
        raise _Invalid(field, f"must be one of {', '.join(choices)}, got {show(value)}")
    return value


def _number(value, field: str, bounds: Bounds):
    problem = bounds.problem(value)
    if problem:
        raise _Invalid(field, problem)
    return value


def _option_value(value, field: str):
    """A provider option: a string, a boolean, an integer or a finite number."""
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return _number(value, field, Bounds(-(2 ** 63), 2 ** 63 - 1, integer=True))
    if isinstance(value, float):
        return _number(value, field, Bounds(-1e300, 1e300))
    raise _Invalid(field, f"must be a string, a boolean or a number, got {show(value)}")


def _providers(data, prefix: str = "") -> tuple:
    if "providers" not in data:
        raise _Invalid(f"{prefix}providers", "missing")
    raw = data["providers"]
    if not isinstance(raw, list) or not raw:
        raise _Invalid(f"{prefix}providers", f"must be a non-empty list of [name, options] pairs, got {show(raw)}")
    providers, seen = [], set()
    for i, entry in enumerate(raw):
        field = f"{prefix}providers[{i}]"
        if not isinstance(entry, list) or len(entry) != 2:
            raise _Invalid(field, f"must be a [name, options] pair, got {show(entry)}")
        name, options = entry
        if not isinstance(name, str) or not name:
            raise _Invalid(f"{field}[0]", f"must be a provider name, got {show(name)}")
        if name in seen:
            raise _Invalid(f"{field}[0]", f"{name} is listed twice")
        seen.add(name)
        if not isinstance(options, dict):
            raise _Invalid(f"{field}[1]", f"must be an object of provider options, got {show(options)}")
        for key, value in options.items():
            where = f"{field}[1].{key}"
            if key == "device_id":
                _number(value, where, DEVICE_ID)
            elif key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
                if not isinstance(value, str) or not _SHAPES.fullmatch(value):
                    raise _Invalid(where, f"must be shapes like \"mel:1x128x40\", got {show(value)}")
            elif key == "trt_engine_cache_path":
                if not isinstance(value, str) or not value.strip() or "\x00" in value:
                    raise _Invalid(where, f"must be a folder path, got {show(value)}")
            else:
                _option_value(value, where)
        providers.append((name, dict(options)))
    return tuple(providers)


_SHAPES = re.compile(r"[A-Za-z_][\w.]*:\d+(x\d+)*(,[A-Za-z_][\w.]*:\d+(x\d+)*)*")


def _graphs(data) -> dict:
    graphs = data.get("graphs", {})
    if not isinstance(graphs, dict):
        raise _Invalid("graphs", f"must be an object with encoder and/or decoder, got {show(graphs)}")
    out = {}
    for graph, settings in graphs.items():
        if graph not in GRAPHS:
            raise _Invalid(f"graphs.{graph}", f"unknown graph (known: {', '.join(GRAPHS)})")
        if not isinstance(settings, dict) or set(settings) != {"providers"}:
            raise _Invalid(f"graphs.{graph}", f"must be an object with only \"providers\", got {show(settings)}")
        out[graph] = _providers(settings, f"graphs.{graph}.")
    return out


def _session(data) -> dict:
    session = data.get("session", {})
    if session is None:
        return {}
    if not isinstance(session, dict):
        raise _Invalid("session", f"must be an object, got {show(session)}")
    for key in session:
        if key not in _SESSION_FIELDS:
            raise _Invalid(f"session.{key}", f"unknown setting (known: {', '.join(_SESSION_FIELDS)})")
    if "intra_op_num_threads" in session:
        threads = session["intra_op_num_threads"]
        if threads != "physical_cores" and not THREADS.holds(threads):
            raise _Invalid("session.intra_op_num_threads", f"must be \"physical_cores\" or {THREADS.wants}, "
                                                           f"got {show(threads)}")
    if "inter_op_num_threads" in session:
        _number(session["inter_op_num_threads"], "session.inter_op_num_threads", THREADS)
    if "execution_mode" in session:
        _string(session["execution_mode"], "session.execution_mode", choices=tuple(_EXECUTION_MODES))
    if "graph_optimization_level" in session:
        _string(session["graph_optimization_level"], "session.graph_optimization_level", choices=tuple(_OPT_LEVELS))
    entries = session.get("config_entries", {})
    if not isinstance(entries, dict):
        raise _Invalid("session.config_entries", f"must be an object of strings, got {show(entries)}")
    for key, value in entries.items():
        if not key or len(key) > _MAX_CONFIG_KEY:
            raise _Invalid("session.config_entries", f"a key must have 1 to {_MAX_CONFIG_KEY} characters")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Invalid(f"session.config_entries.{key}", f"must be a string, got {show(value)}")
    return dict(session)


def _parse_profile(data, stem: str) -> Profile:
    if not isinstance(data, dict):
        raise _Invalid(None, "must hold a JSON object")
    name = _string(data.get("name", stem), "name")
    description = _string(data.get("description", ""), "description")
    providers = _providers(data)
    session = _session(data)
    device = _string(data.get("kv_cache_device", "cpu"), "kv_cache_device", choices=("cpu", "cuda"))
    max_context = data.get("max_context")
    if max_context is not None:
        problem = CONTEXT.problem(max_context)
        if problem:
            raise _Invalid("max_context", f"{problem} (or null)")
    slots = data.get("slots")
    if slots is not None:
        problem = SLOTS.problem(slots)
        if problem:
            raise _Invalid("slots", f"{problem} (or null)")
    return Profile(name=name, providers=providers, session=session, kv_cache_device=device,
                   max_context=max_context, description=description, graph_providers=_graphs(data), slots=slots)


def load_profile(name_or_path) -> Profile:
    """A profile by name (one of available_profiles()) or from a JSON file path.

    Every field is checked here (runtime/PACKAGE_FORMAT.md, "Device profiles"); a problem is
    one DeviceError line naming the profile file and the field."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = Path(str(name_or_path))
    if path.suffix != ".json":
        path = profiles_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise DeviceError(f"unknown profile {show(str(name_or_path))}; choose one of "
                          f"{', '.join(available_profiles())} or a .json file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DeviceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DeviceError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise DeviceError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer with too many digits
        raise DeviceError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    try:
        return _parse_profile(data, path.stem)
    except _Invalid as exc:
        raise DeviceError(f"{path}: {exc}") from None


def cpu_fallback(profile: Profile) -> Profile:
    """The profile on CPU alone: one stream per decoder call, as the cpu profile runs."""
    return replace(profile, providers=((CPU, {}),), kv_cache_device="cpu", graph_providers={}, slots=None)


def resolve_providers(profile: Profile) -> Profile:
    """Drop providers this onnxruntime lacks; warn when the profile's first choice is not used."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())

    def keep(providers: tuple, what: str) -> tuple:
        kept = tuple((name, opts) for name, opts in providers if name in available)
        if not any(name == CPU for name, _ in kept):
            kept = kept + ((CPU, {}),)
        missing = [name for name, _ in providers if name not in available]
        if missing:
            log.warning("profile %r asked for %s%s, which this onnxruntime does not provide (available: %s); "
                        "running on %s", profile.name, ", ".join(missing), what, ", ".join(sorted(available)),
                        kept[0][0])
        return kept

    resolved = replace(profile, providers=keep(profile.providers, ""),
                       graph_providers={g: keep(p, f" for the {g}") for g, p in profile.graph_providers.items()})
    if resolved.primary == CPU:
        resolved = replace(resolved, kv_cache_device="cpu")
    return resolved


def session_options(profile: Profile):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    settings = profile.session
    threads = settings.get("intra_op_num_threads", 0)
    opts.intra_op_num_threads = physical_cores() if threads == "physical_cores" else int(threads)
    opts.inter_op_num_threads = int(settings.get("inter_op_num_threads", 0))
    opts.execution_mode = getattr(ort.ExecutionMode, _EXECUTION_MODES[settings.get("execution_mode", "sequential")])
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            _OPT_LEVELS[settings.get("graph_optimization_level", "all")])
    for key, value in settings.get("config_entries", {}).items():
        opts.add_session_config_entry(key, str(value))
    opts.log_severity_level = 3  # ORT's own warnings are noise for users; ours say what matters
    return opts


def provider_arguments(profile: Profile, graph: str = "decoder") -> tuple[list, list]:
    """(providers, provider_options) of one graph as InferenceSession wants them, with paths
    expanded."""
    names, options = [], []
    for name, opts in profile.providers_for(graph):
        opts = {k: (os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v) for k, v in opts.items()}
        if "trt_engine_cache_path" in opts:
            os.makedirs(opts["trt_engine_cache_path"], exist_ok=True)
        names.append(name)
        options.append({k: _option_text(v) for k, v in opts.items()})
    return names, options


def _option_text(value) -> str:
    # ORT takes provider options as strings; booleans as "1"/"0".
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)
