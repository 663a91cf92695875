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
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import DeviceError

log = logging.getLogger("listenloop")

CPU = "CPUExecutionProvider"
_EXECUTION_MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class Profile:
    name: str
    providers: tuple  # ((provider name, options dict), ...) in order of preference
    session: dict = field(default_factory=dict)
    kv_cache_device: str = "cpu"  # "cpu" or "cuda"
    max_context: int | None = None
    description: str = ""

    @property
    def primary(self) -> str:
        return self.providers[0][0]


def profiles_dir() -> Path:
    import listenloop.runtime as runtime_data

    return Path(runtime_data.__file__).parent / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.json"))


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


def load_profile(name_or_path) -> Profile:
    """A profile by name (cpu, cuda, jetson) or from a JSON file path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = Path(str(name_or_path))
    if path.suffix != ".json":
        path = profiles_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise DeviceError(f"unknown profile {name_or_path!r}; choose one of {', '.join(available_profiles())} or a .json file")
    try:
        data = json.loads(path.read_text())
        providers = tuple((str(p), dict(opts)) for p, opts in data["providers"])
        if not providers:
            raise ValueError("providers is empty")
        device = data.get("kv_cache_device", "cpu")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"kv_cache_device must be cpu or cuda, got {device!r}")
        max_context = data.get("max_context")
        if max_context is not None and (not isinstance(max_context, int) or max_context <= 0):
            raise ValueError("max_context must be a positive integer or null")
        return Profile(name=str(data.get("name", path.stem)), providers=providers,
                       session=dict(data.get("session", {})), kv_cache_device=device,
                       max_context=max_context, description=str(data.get("description", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise DeviceError(f"{path}: invalid profile ({exc})") from None


def cpu_fallback(profile: Profile) -> Profile:
    return replace(profile, providers=((CPU, {}),), kv_cache_device="cpu")


def resolve_providers(profile: Profile) -> Profile:
    """Drop providers this onnxruntime lacks; warn when the profile's first choice is not used."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    kept = tuple((name, opts) for name, opts in profile.providers if name in available)
    if not any(name == CPU for name, _ in kept):
        kept = kept + ((CPU, {}),)
    missing = [name for name, _ in profile.providers if name not in available]
    if missing:
        log.warning("profile %r asked for %s, which this onnxruntime does not provide (available: %s); running on %s",
                    profile.name, ", ".join(missing), ", ".join(sorted(available)), kept[0][0])
    resolved = replace(profile, providers=kept)
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


def provider_arguments(profile: Profile) -> tuple[list, list]:
    """(providers, provider_options) as InferenceSession wants them, with paths expanded."""
    names, options = [], []
    for name, opts in profile.providers:
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
