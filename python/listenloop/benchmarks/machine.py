"""The machine and process a run measures on: CPU, memory, RSS, software, package."""
from __future__ import annotations

import os
import platform
import time


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set size of this process now, MiB (Linux /proc, else psutil, else NaN)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def environment(model) -> dict:
    """Machine, software and package of a run on `model` (a listenloop.model.Model)."""
    import onnxruntime as ort

    from .. import __version__
    from ..profiles import physical_cores

    dec = model.package.decoder
    env = {"listenloop": __version__, "onnxruntime": ort.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
           "physical_cores": physical_cores(), "load_average": list(os.getloadavg()),
           "profile": model.profile.name, "providers": list(model.providers),
           "intra_op_threads": model.decoder.get_session_options().intra_op_num_threads,
           "package": str(model.package.path), "model": model.package.name,
           "precision": dec["precision"], "encoder_precision": model.package.manifest["encoder"]["precision"],
           "io_dtype": dec["io_dtype"], "layers": dec["num_layers"], "hidden_size": dec["hidden_size"],
           "vocab_size": dec["vocab_size"], "context_capacity": model.capacity, "kv_bytes_per_stream": model.kv_bytes,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "CUDAExecutionProvider" in model.providers:
        env["device"] = _gpu_name()
    else:
        env["device"] = env["cpu"]
    return env


def _gpu_name() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "CUDA device"
