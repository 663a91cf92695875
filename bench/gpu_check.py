"""GPU check: TTFR, listening step and decode speed of real-dimension random weights on one GPU,
at each precision, with and without CUDA graphs, in one JSON file.

    scripts/gpu/check.sh                     # on the GPU machine: the whole check, under 8 minutes
    python bench/gpu_check.py --out gpu_check.json --work /tmp/listenloop-gpu-check \\
        [--dims real|tiny] [--layers N] [--precisions fp16,int4] [--profiles cuda,cuda-graphs] [--quick]
    python bench/gpu_check.py --summary gpu_check.json      # the table of a finished run

Steps: a seeded random checkpoint (listenloop.export.tiny: real dimensions, 36 layers, hidden
2048, 16 heads / 2 KV heads, head_dim 128, vocab 151936 and the real-size audio encoder; or the
tiny test model), one `--attention gqa` package per precision (GroupQueryAttention: fixed step
shapes, so CUDA graphs are possible; int4 with `--kv-dtype float16`, since CUDA's kernel runs
float16), then one cell per precision x profile. Everything already
in --work is reused. Each step runs in its own process with a time limit, so a hang, a crash or
the global --deadline costs one cell, never the JSON, which is rewritten after every step.

Per cell, on one Model loaded by listenloop.benchmarks.latency.measure_startup (medians unless named p50):
    ttfr_p50_ms               encoder of the triggering chunk + its 13-token listening step +
                              TEXT_BEGIN -> first reply token, on a DecoderStream (latency.measure_reply)
    ttfr_end_to_end_p50_ms    the same through a real Session fed in real time: last sample of the
                              triggering chunk written -> first TextDelta event (latency.measure_session)
    listening_step_ms         one 0.4 s chunk at the start of the context: C++ mel + encoder +
                              decoder step (latency.measure_listening); also encoder_ms, decoder_step_ms
    decoder_step_at_2000_ms   decoder listening step with ~2000 tokens cached (latency.measure_context),
                              measured when the cell's time budget allows it
    listening_step_at_2000_ms encoder_ms + decoder_step_at_2000_ms (sum of medians)
    decode_tokens_per_s       1-token reply decode steps per second (latency.measure_reply)
and what really ran: the providers of both graphs, whether CUDA graphs are on for the decoder
(cuda_graphs) and the encoder (encoder_cuda_graphs), the KV cache device, and every warning the
runtime logged (a CUDA profile falls back to CPU with one). Cells run one stream per decoder
call (the profile's "slots" off), so every precision measures the same path; the slot decoder is
measured by the streams section. Counts (chunks, reply rounds, steps) are cut to fit
--cell-seconds after a warm-up step.

Streams per call (`streams`, per precision of --stream-precisions, default fp16): the
package also gets the slot decoder (`--slots`), and one Model on the first profile, with the
slot decoder and a capacity of --streams-context, runs listenloop.benchmarks.slots for each of
--stream-counts streams (a pool of that many slots, fed from the example recordings, every chunk
arriving at once, all encoded in one call, one shared listening step, one scripted reply per
round):
    streams_real_time         the most streams kept in real time: p99 TTFR (arrival -> first reply
                              token) <= 60 ms and every round's work <= 0.4 s; 0: none
    counts[]                  per count: ttfr_ms, round_ms, listening_step_ms (medians and p99)

The peer (`peer`, once, after the first precision's cells): PyTorch eager on the same decoder,
Hugging Face transformers' Qwen2ForCausalLM with SDPA attention, built from the checkpoint's
config with random weights, float16 on CUDA, in the same run (a fixed, published baseline):
    listening_step_ms         13-token step after a 32-token prompt (median, p99, n)
    reply_token_ms            1-token step; decode_tokens_per_s from them

Top level: "gpu" is true when a CUDA session really runs on this machine; "complete" is true only
when every cell was measured on CUDAExecutionProvider (both graphs) and got the CUDA graphs its
profile asks for (the streams section says where it ran in its own "ran"). On a machine without
CUDA the same code runs on the provider it falls back to.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from listenloop.package import SLOT_PRECISIONS
from listenloop.protocol import PRECISIONS

CUDA = "CUDAExecutionProvider"
CONTEXT_TOKENS = 2000
SEED = 0
FIGURES = ("ttfr_p50_ms", "ttfr_end_to_end_p50_ms", "listening_step_ms", "encoder_ms", "decoder_step_ms",
           "decoder_step_at_2000_ms", "listening_step_at_2000_ms", "first_token_ms", "decode_tokens_per_s",
           "load_ms")
FULL = {"chunks": 40, "rounds": 8, "reply_tokens": 32, "context_steps": 10, "session_chunks": 10, "cell_seconds": 30}
QUICK = {"chunks": 10, "rounds": 3, "reply_tokens": 4, "context_steps": 3, "session_chunks": 5, "cell_seconds": 20}
LOAD_SECONDS = {"real": 90, "tiny": 30}  # allowance for the model load of a cell, on top of cell_seconds
STREAM_COUNTS = "1,8,32,64,128,256"
STREAM_PRECISIONS = "fp16"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def finite(value):
    """JSON without NaN or Infinity (not JSON): such a number becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Whole file or nothing: a reader never sees half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(finite(data), indent=1, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


# --- environment -----------------------------------------------------------------------------

def nvidia_smi() -> dict | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        name, driver, memory = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
        return {"name": name, "driver": driver, "memory": memory}
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def probe_model():
    """The probe's one-node graph (Relu). Its IR version is explicit: onnx 1.23 writes IR 14 by
    default, newer than onnxruntime 1.31 loads, and a probe that cannot load reports no GPU."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def cuda_probe() -> dict:
    """A one-node graph on CUDAExecutionProvider: does CUDA really run (not only listed)?"""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return {"ran_on": None, "error": f"this onnxruntime has no {CUDA}"}
    try:
        import numpy as np

        session = ort.InferenceSession(probe_model().SerializeToString(), providers=[CUDA])
        session.run(None, {"x": np.array([-1, 2], np.float32)})
        return {"ran_on": session.get_providers()[0], "error": None}
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable CUDA
        return {"ran_on": None, "error": one_line(exc)}


def git_revision(root: Path) -> dict | None:
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(work: Path) -> dict:
    import onnxruntime as ort

    import listenloop
    from listenloop.benchmarks.machine import cpu_model, total_memory_bytes
    from listenloop.profiles import physical_cores

    memory = total_memory_bytes()
    memory_gb = None if memory is None else memory / 1e9
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": nvidia_smi(),
            "cuda_probe": cuda_probe(), "onnxruntime": ort.__version__, "onnxruntime_path": ort.__file__,
            "providers_available": ort.get_available_providers(), "listenloop": listenloop.__version__,
            "git": git_revision(Path(__file__).resolve().parents[1]), "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "physical_cores": physical_cores(), "memory_gb": memory_gb,
            "disk_free_gb": shutil.disk_usage(work).free / 1e9, "load_average": list(os.getloadavg())}


# --- jobs: each runs in its own process (python gpu_check.py --job SPEC) ----------------------

def job_checkpoint(spec: dict, result: dict, save) -> None:
    from listenloop.export.tiny import make_real_size, make_tiny

    if spec["dims"] == "real":
        make_real_size(spec["out"], SEED, layers=spec["layers"])
    else:
        make_tiny(spec["out"], SEED)


def job_export(spec: dict, result: dict, save) -> None:
    from listenloop.export.package import export_package

    # int4 with float16 activations and KV: CUDA's GroupQueryAttention runs float16 only
    export_package(spec["checkpoint"], spec["out"], precision=spec["precision"], max_context=spec["max_context"],
                   attention="gqa", kv_dtype="float16" if spec["precision"] == "int4" else None,
                   slots=spec.get("slots", False))


def profile_with(profile: str, work: Path, suffix: str, **changes) -> str:
    """A copy of `profile` (a name or a .json) with `changes`, named `<name>-<suffix>`, in `work`."""
    from listenloop.profiles import load_profile, profiles_dir

    source = Path(profile) if profile.endswith(".json") else profiles_dir() / f"{profile}.json"
    data = json.loads(source.read_text())
    data.update(name=f"{load_profile(profile).name}-{suffix}", **changes)
    path = work / f"{data['name']}.json"
    write_json(path, data)
    return str(path)


def job_streams(spec: dict, result: dict, save) -> None:
    """The slot decoder's streams per call on one Model (listenloop.benchmarks.slots)."""
    from listenloop.benchmarks import inputs
    from listenloop.benchmarks.slots import measure_slot_streams
    from listenloop.model import Model

    warnings = result["ran"]["warnings"]

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage()[:500])

    logging.getLogger("listenloop").addHandler(Collect(logging.WARNING))
    # the cell's profile with the slot decoder on; the Model's own pool is the smallest, since the
    # measurement makes a pool per count
    profile = profile_with(spec["profile"], Path(spec["work"]), "slots", slots=1)
    result["phase"] = "load"
    save()
    model = Model(spec["package"], profile, max_context=spec["context"])
    result["ran"].update(providers=list(model.providers), encoder_providers=list(model.encoder.get_providers()),
                         cuda_graphs=bool(model.cuda_graphs), encoder_cuda_graphs=bool(model.encoder_graphs),
                         kv_cache_device=model.profile.kv_cache_device,
                         profile=model.profile.name, slot_decoder=bool(model.slots))
    result["phase"] = "streams"
    save()
    mels = inputs.chunk_mels(inputs.example_pcm())  # the example recordings, each stream from its own offset
    measured = measure_slot_streams(model, mels, spec["counts"], spec["rounds"], spec["reply_tokens"],
                                    seconds=spec["seconds"], log=lambda line: print(line, file=sys.stderr))
    result.update(measured)


def job_peer(spec: dict, result: dict, save) -> None:
    """PyTorch eager on the same decoder: Hugging Face transformers' Qwen2ForCausalLM (SDPA
    attention) built from the checkpoint's config with its own random weights, float16 on CUDA
    (float32 on a CPU fallback). The work of a cell: a 13-token listening step after a 32-token
    prompt (each on an untimed copy of the prompt's cache) and 1-token reply steps."""
    import copy

    import torch
    import transformers
    from transformers import Qwen2ForCausalLM
    from transformers.cache_utils import DynamicCache

    from listenloop.benchmarks.stats import summarize
    from listenloop.export.checkpoint import hf_qwen2_config, validate_checkpoint

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    result["ran"] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
                     "attention": "sdpa", "torch": torch.__version__, "transformers": transformers.__version__}
    result["phase"] = "load"
    save()
    config = hf_qwen2_config(validate_checkpoint(Path(spec["checkpoint"]))[0])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    result["phase"] = "measure"
    save()

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t)

    prompt_len, hidden = 32, config.hidden_size
    generator = torch.Generator(device).manual_seed(SEED)
    with torch.inference_mode():
        prompt_cache = DynamicCache()
        model(inputs_embeds=torch.randn(1, prompt_len, hidden, device=device, dtype=dtype, generator=generator),
              past_key_values=prompt_cache, use_cache=True)
        step = torch.randn(1, 13, hidden, device=device, dtype=dtype, generator=generator)
        cache = None

        def listen():
            model(inputs_embeds=step, past_key_values=cache, use_cache=True)

        token = torch.zeros(1, 1, dtype=torch.long, device=device)

        def reply_token():
            model(input_ids=token, past_key_values=cache, use_cache=True)

        start = time.perf_counter()
        listen_ms = []
        for i in range(3 + spec["steps"]):  # 3 warm-up steps: kernels chosen, memory pools grown
            if i >= 3 and time.perf_counter() - start > spec["seconds"] / 2:
                break
            cache = copy.deepcopy(prompt_cache)
            elapsed = timed(listen)
            if i >= 3:
                listen_ms.append(elapsed)
        reply_token()
        token_ms = []
        while len(token_ms) < spec["tokens"] and time.perf_counter() - start < spec["seconds"]:
            token_ms.append(timed(reply_token))
    result["figures"] = {"listening_step_ms": summarize(listen_ms), "reply_token_ms": summarize(token_ms),
                         "decode_tokens_per_s": 1000 * len(token_ms) / sum(token_ms) if token_ms else None}


class NotMeasured(Exception):
    """A cell that would only measure something else than what it is for."""


def _fit(wanted: int, each_s: float, seconds: float, least: int) -> int:
    """How many items of `each_s` seconds fit in `seconds`: at least `least`, at most `wanted`."""
    if each_s <= 0 or not math.isfinite(each_s):
        return wanted
    return max(least, min(wanted, int(seconds / each_s)))


def job_cell(spec: dict, result: dict, save) -> None:
    """Load the package on the profile, say what runs, then the figures within spec's budget."""
    from listenloop.benchmarks import inputs, latency, machine
    from listenloop.profiles import load_profile
    from listenloop.protocol import CHUNK_SECONDS

    warnings = result["ran"]["warnings"]

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage()[:500])

    logging.getLogger("listenloop").addHandler(Collect(logging.WARNING))
    figures, details, skipped, seconds = result["figures"], result["details"], result["skipped"], result["seconds"]

    def phase(name):
        result["phase"] = name
        save()
        return time.perf_counter()

    asked, decoder_options = load_profile(spec["profile"]).providers_for("decoder")[0]
    result["ran"]["cuda_graphs_requested"] = bool(decoder_options.get("enable_cuda_graph"))
    # one stream per decoder call, whatever the profile's slots: every precision's cell measures
    # the same path (the int4 package has no slot decoder); the streams section measures slots
    profile = profile_with(spec["profile"], Path(spec["work"]), "one-stream", slots=None)
    t = phase("load")
    startup, runtime = latency.measure_startup(spec["package"], profile)
    seconds["load"] = time.perf_counter() - t
    try:
        model = runtime.model
        result["ran"].update(providers=list(model.providers), encoder_providers=list(model.encoder.get_providers()),
                             cuda_graphs=bool(model.cuda_graphs), encoder_cuda_graphs=bool(model.encoder_graphs),
                             kv_cache_device=model.profile.kv_cache_device, profile=model.profile.name)
        details["startup"] = startup
        details["environment"] = machine.environment(model)
        if model.providers[0] != asked and not spec["measure_fallback"]:
            # a real-size model on a CPU fallback needs minutes per figure: the warnings say why it fell back
            raise NotMeasured(f"the profile asks for {asked} but the decoder runs on {model.providers[0]} "
                              "(see ran.warnings); not measured at real dimensions")
        figures["load_ms"] = startup["load_ms"]
        budget_end = time.perf_counter() + spec["cell_seconds"]

        def left():
            return budget_end - time.perf_counter()

        # Warm-up, untimed in the figures: first runs (allocations, CUDA graph capture of the
        # listening step and of the reply token), and the step costs that size the counts below.
        t = phase("warm-up")
        mels = inputs.chunk_mels(inputs.synthetic_audio(CHUNK_SECONDS * max(64, spec["chunks"]), seed=0))
        warm_listen = latency.measure_listening(model, mels[:3])
        warm_reply = latency.measure_reply(model, mels, 1, 2)
        step_s = warm_listen["step_ms"]["median"] / 1000
        decoder_s = warm_listen["decoder_step_ms"]["median"] / 1000
        token_s = warm_reply["first_token_ms"]["median"] / 1000
        seconds["warm_up"] = time.perf_counter() - t

        t = phase("listening")
        chunks = _fit(spec["chunks"], step_s, 0.25 * left(), 3)
        listening = latency.measure_listening(model, mels[:chunks])
        listening.pop("samples_ms", None)
        details["listening"] = listening
        figures.update(listening_step_ms=listening["step_ms"]["median"], encoder_ms=listening["encoder_ms"]["median"],
                       decoder_step_ms=listening["decoder_step_ms"]["median"])
        seconds["listening"] = time.perf_counter() - t

        t = phase("reply")
        round_s = 3 * step_s + spec["reply_tokens"] * token_s  # prefix step, trigger step, encoder, reply
        rounds = _fit(spec["rounds"], round_s, 0.5 * left(), 3)
        reply = latency.measure_reply(model, mels, rounds, spec["reply_tokens"])
        details["reply"] = reply
        figures.update(ttfr_p50_ms=reply["engine_ttfr_ms"]["median"], first_token_ms=reply["first_token_ms"]["median"],
                       decode_tokens_per_s=reply["tokens_per_s"]["median"])
        seconds["reply"] = time.perf_counter() - t

        session_s = spec["session_chunks"] * CHUNK_SECONDS + 3  # real-time feeding, set-up and finish

        def context():
            # filling steps to the length, then the timed ones; longer contexts cost more per step
            context_s = 1.5 * decoder_s * (CONTEXT_TOKENS / 13 + spec["context_steps"])
            if context_s > left() - (session_s if spec["session_chunks"] else 0):
                skipped["context"] = f"would take about {context_s:.0f} s, {max(left(), 0):.0f} s of the budget left"
                return
            row = latency.measure_context(model, mels, (CONTEXT_TOKENS,), spec["context_steps"])[0]
            details["context"] = row
            if "skipped" in row:
                skipped["context"] = row["skipped"]
            else:
                figures["decoder_step_at_2000_ms"] = row["step_ms"]["median"]
                figures["listening_step_at_2000_ms"] = figures["encoder_ms"] + row["step_ms"]["median"]

        def session():
            if not spec["session_chunks"]:
                skipped["session"] = "--session-chunks 0"
            elif figures["listening_step_ms"] > 750 * CHUNK_SECONDS:
                skipped["session"] = (f"a listening step takes {figures['listening_step_ms']:.0f} ms: too close to "
                                      "real time, TTFR would measure the backlog")
            elif session_s > left():
                skipped["session"] = f"would take about {session_s:.0f} s, {max(left(), 0):.0f} s of the budget left"
            else:
                run = latency.measure_session(runtime, spec["session_chunks"], min(spec["reply_tokens"], 16), 2)
                details["session"] = run
                if run["ttfr_ms"].get("n"):
                    figures["ttfr_end_to_end_p50_ms"] = run["ttfr_ms"]["median"]
                else:
                    skipped["session"] = f"no fresh reply in {spec['session_chunks']} chunks"

        # the secondary figures: a failure there is recorded and leaves the cell's main figures standing
        for name, measure in (("context", context), ("session", session)):
            t = phase(name)
            try:
                measure()
            except Exception as exc:  # noqa: BLE001 - one line in `skipped`
                skipped[name] = f"failed: {one_line(exc)}"
            seconds[name] = time.perf_counter() - t
    finally:
        runtime.close()


JOBS = {"checkpoint": job_checkpoint, "export": job_export, "cell": job_cell, "streams": job_streams, "peer": job_peer}


def run_job(spec_path: str) -> int:
    """Child side: run one job; its result file is rewritten at every phase (a killed job leaves
    what it had), and a failure is one line in it."""
    spec = json.loads(Path(spec_path).read_text())
    result = spec.get("initial", {})
    out = Path(spec["result"])

    def save():
        write_json(out, result)

    start = time.perf_counter()
    try:
        JOBS[spec["kind"]](spec, result, save)
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - recorded, and the exit status says so
        where = f"in {result['phase']}: " if result.get("phase") else ""
        result.update(status="failed", error=where + one_line(exc))
    result["job_seconds"] = time.perf_counter() - start
    save()
    return 0 if result["status"] == "ok" else 1


# --- the orchestrating process ---------------------------------------------------------------

class Check:
    def __init__(self, args, command: str):
        self.args, self.start = args, time.monotonic()
        self.stopped = None  # the exception that stopped a job, raised again once its result is kept
        self.out, self.work = Path(args.out).absolute(), Path(args.work).absolute()
        settings = dict(QUICK if args.quick else FULL)
        for key in settings:
            if getattr(args, key, None) is not None:
                settings[key] = getattr(args, key)
        self.settings = settings
        label = "tiny" if args.dims == "tiny" else f"real-{args.layers}l"
        self.root = self.work / label
        self.report = {
            "what": "listenloop GPU check: TTFR, listening step and 1-token decode speed per precision x profile, "
                    "random weights, gqa packages (bench/gpu_check.py)",
            "command": command, "cwd": os.getcwd(), "python_executable": sys.executable,
            "gpu": False, "complete": False, "dims": args.dims,
            "layers": args.layers if args.dims == "real" else None,
            "settings": dict(settings, context_tokens=CONTEXT_TOKENS, deadline_s=args.deadline, seed=SEED,
                             attention="gqa", max_context=args.max_context),
            "environment": None, "phases": {"checkpoint": None, "export": {}}, "cells": [], "streams": {},
            "peer": {"status": "pending", "error": None, "phase": None, "ran": None, "figures": None,
                     "wall_seconds": None},
            "error": None, "seconds_total": None}
        for precision in filter(self.wants_slots, args.precisions):
            self.report["streams"][precision] = {
                "status": "pending", "error": None, "phase": None, "profile": args.profiles[0],
                "context": args.streams_context, "ran": {"providers": None, "warnings": []},
                "streams_real_time": None, "counts": [], "skipped": {}, "wall_seconds": None}
        for precision in args.precisions:
            for profile in args.profiles:
                self.report["cells"].append({
                    "precision": precision, "profile": profile, "package": str(self.package_dir(precision)),
                    "status": "pending", "error": None, "phase": None,
                    "ran": {"providers": None, "encoder_providers": None, "cuda_graphs": None,
                            "cuda_graphs_requested": None, "kv_cache_device": None, "profile": None, "warnings": []},
                    "figures": dict.fromkeys(FIGURES), "skipped": {}, "seconds": {}, "wall_seconds": None,
                    "details": {}})

    def package_dir(self, precision: str) -> Path:
        return self.root / f"{precision}-gqa"

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def save(self) -> None:
        cells = self.report["cells"]
        self.report["complete"] = bool(cells) and all(
            c["status"] == "ok" and (c["ran"]["providers"] or [None])[0] == CUDA
            and (c["ran"]["encoder_providers"] or [None])[0] == CUDA
            and c["ran"]["cuda_graphs"] == c["ran"]["cuda_graphs_requested"] for c in cells)
        self.report["seconds_total"] = time.monotonic() - self.start
        write_json(self.out, self.report)

    def say(self, line: str) -> None:
        print(f"... [{time.monotonic() - self.start:5.0f} s] {line}", file=sys.stderr, flush=True)

    def job(self, kind: str, spec: dict, limit: float, initial: dict | None = None) -> dict:
        """Run a job in a child process for at most `limit` seconds; its result (partial if it
        was killed), with status and a one-line error when it did not finish."""
        self.root.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = self.root / f".job-{kind}.json", self.root / f".job-{kind}.result.json"
        result_path.unlink(missing_ok=True)
        write_json(spec_path, dict(spec, kind=kind, result=str(result_path), initial=initial or {}))
        start = time.monotonic()
        try:
            # the child's output goes to our stderr: stdout is kept for the summary table
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--job", str(spec_path)],
                                  stdin=subprocess.DEVNULL, stdout=2, timeout=max(limit, 1))
            problem = None if proc.returncode in (0, 1) else f"the {kind} process ended with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"stopped after {time.monotonic() - start:.0f} s (time limit)"
        except BaseException as exc:  # SIGTERM, Ctrl-C: the child is killed; keep what it wrote
            problem, self.stopped = "the check was stopped", exc
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = dict(initial or {})
        if problem:
            where = f" during {result['phase']}" if result.get("phase") else ""
            result.update(status="failed", error=problem + where)
        result.setdefault("status", "failed")
        result["wall_seconds"] = time.monotonic() - start
        return result

    def checkpoint(self) -> Path | None:
        """The checkpoint, made once per run and only when a package has to be exported."""
        path = self.root / "checkpoint"
        phases = self.report["phases"]
        if phases["checkpoint"] is not None:
            return path if phases["checkpoint"]["error"] is None else None
        if path.is_dir():
            phases["checkpoint"] = {"path": str(path), "reused": True, "seconds": 0.0, "error": None}
            return path
        partial = self.root / "checkpoint.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.say(f"checkpoint ({self.args.dims} dims) -> {path}")
        r = self.job("checkpoint", {"dims": self.args.dims, "layers": self.args.layers, "out": str(partial)},
                     self.left() - 5)
        phases["checkpoint"] = {"path": str(path), "reused": False, "seconds": r["wall_seconds"],
                               "error": r.get("error")}
        self.save()
        if r["status"] != "ok":
            shutil.rmtree(partial, ignore_errors=True)
            return None
        os.replace(partial, path)  # only a finished checkpoint gets the name that is reused
        return path

    def wants_slots(self, precision: str) -> bool:
        return bool(self.args.stream_counts) and precision in self.args.stream_precisions

    def package(self, precision: str) -> tuple[Path | None, str | None]:
        out = self.package_dir(precision)
        exports = self.report["phases"]["export"]
        if (out / "manifest.json").is_file():
            exports[precision] = {"path": str(out), "reused": True, "seconds": 0.0, "error": None}
            return out, None
        checkpoint = self.checkpoint()
        if checkpoint is None:
            return None, "no checkpoint: " + str(self.report["phases"]["checkpoint"]["error"])
        self.say(f"export {precision} (gqa) -> {out}")
        free = shutil.disk_usage(self.root).free / 1e9
        r = self.job("export", {"checkpoint": str(checkpoint), "out": str(out), "precision": precision,
                                "max_context": self.args.max_context, "slots": self.wants_slots(precision)},
                     self.left() - 5)
        exports[precision] = {"path": str(out), "reused": False, "seconds": r["wall_seconds"], "error": r.get("error"),
                              "disk_free_gb_before": free}
        for leftover in self.root.glob(f".{out.name}.partial-*"):  # a killed export's temporary folder
            shutil.rmtree(leftover, ignore_errors=True)
        self.save()
        return (out, None) if r["status"] == "ok" else (None, f"export failed: {r.get('error')}")

    def cell(self, cell: dict) -> None:
        self.say(f"cell {cell['precision']} / {cell['profile']}")
        limit = min(self.left() - 2, LOAD_SECONDS[self.args.dims] + 1.5 * self.settings["cell_seconds"] + 10)
        spec = {k: self.settings[k] for k in ("chunks", "rounds", "reply_tokens", "context_steps", "session_chunks",
                                              "cell_seconds")}
        spec.update(package=cell["package"], profile=cell["profile"], measure_fallback=self.args.dims == "tiny",
                    work=str(self.root))
        initial = {k: cell[k] for k in ("ran", "figures", "skipped", "seconds", "details")}
        r = self.job("cell", spec, limit, initial)
        for key in ("ran", "figures", "skipped", "seconds", "details", "status", "error", "phase", "wall_seconds"):
            if key in r:
                cell[key] = r[key]
        if cell["status"] == "ok":
            cell["phase"] = None

    def peer(self) -> None:
        """PyTorch eager on the same decoder dimensions (job_peer), once, after the first cells."""
        entry = self.report["peer"]
        checkpoint = self.checkpoint()
        if checkpoint is None or self.left() < 20:
            entry.update(status="skipped", error="no checkpoint" if checkpoint is None else "out of time (--deadline)")
            return
        self.say("PyTorch eager peer (transformers Qwen2, SDPA)")
        spec = {"checkpoint": str(checkpoint), "steps": self.settings["chunks"], "tokens": self.settings["reply_tokens"],
                "seconds": self.settings["cell_seconds"]}
        r = self.job("peer", spec, min(self.left() - 2, LOAD_SECONDS[self.args.dims] + self.settings["cell_seconds"]))
        for key in ("ran", "figures", "status", "error", "phase", "wall_seconds"):
            if key in r:
                entry[key] = r[key]
        self.save()

    def streams(self, precision: str, package: Path) -> None:
        entry = self.report["streams"][precision]
        manifest = json.loads((package / "manifest.json").read_text())
        if "slot_decoder" not in manifest:
            entry.update(status="skipped", error=f"{package} has no slot decoder (an older export: remove it from "
                                                 "--work to export it again)")
            return
        self.say(f"streams {precision} / {entry['profile']}: {self.args.stream_counts}")
        limit = min(self.left() - 2, LOAD_SECONDS[self.args.dims] + 1.5 * self.settings["cell_seconds"] + 10)
        spec = {"package": str(package), "profile": entry["profile"], "context": self.args.streams_context,
                "counts": self.args.stream_counts, "rounds": self.settings["rounds"],
                "reply_tokens": min(self.settings["reply_tokens"], 8), "seconds": self.settings["cell_seconds"],
                "work": str(self.root)}
        r = self.job("streams", spec, limit, {"ran": entry["ran"]})
        for key in ("ran", "status", "error", "phase", "wall_seconds", "streams_real_time", "counts", "skipped"):
            if key in r:
                entry[key] = r[key]
        if entry["status"] == "ok":
            entry["phase"] = None

    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.report["environment"] = environment(self.work)
        self.report["gpu"] = self.report["environment"]["cuda_probe"]["ran_on"] == CUDA
        self.save()
        cells = self.report["cells"]
        for precision in self.args.precisions:  # one precision's cells before the next export
            mine = [c for c in cells if c["precision"] == precision]
            if self.left() < 10:
                self.skip(mine, "out of time (--deadline) before the export")
                continue
            package, problem = self.package(precision)
            self.raise_if_stopped()
            if package is None:
                self.skip(mine, problem)
                if precision in self.report["streams"]:
                    self.report["streams"][precision].update(status="skipped", error=problem)
                continue
            for cell in mine:
                if self.left() < 10:
                    self.skip([cell], "out of time (--deadline)")
                    continue
                self.cell(cell)
                self.save()
                self.raise_if_stopped()
            if self.report["peer"]["status"] == "pending":
                self.peer()
            if precision in self.report["streams"]:
                if self.left() < 10:
                    self.report["streams"][precision].update(status="skipped", error="out of time (--deadline)")
                else:
                    self.streams(precision, package)
                self.save()
                self.raise_if_stopped()

    def raise_if_stopped(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    def skip(self, cells: list, reason: str) -> None:
        for cell in cells:
            cell.update(status="skipped", error=reason)
        self.save()


# --- summary table ---------------------------------------------------------------------------

def _num(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(report: dict, path=None) -> str:
    env = report.get("environment") or {}
    device = (env.get("gpu") or {}).get("name") or env.get("cpu", "?")
    lines = [f"GPU check: gpu={str(report['gpu']).lower()} complete={str(report['complete']).lower()} | {device} | "
             f"ORT {env.get('onnxruntime', '?')} | {report['dims']} dims | {_num(report.get('seconds_total'), 0)} s"
             + (f" | {path}" if path else "")]
    if not report["gpu"]:
        lines.append("  no CUDA device ran here: these are not GPU figures")
    if report.get("error"):
        lines.append(f"  error: {report['error']}")
    phases = report["phases"]
    steps = [("checkpoint", phases["checkpoint"])] + [(f"export {k}", v) for k, v in phases["export"].items()]
    for label, p in steps:
        if p is not None:
            lines.append(f"  {label:16s} {'reused' if p['reused'] else _num(p['seconds'], 1) + ' s'}"
                         + (f"  FAILED: {p['error']}" if p.get("error") else ""))
    lines.append(f"  {'precision':9s} {'profile':12s} {'decoder ran on':22s} {'graphs':6s} {'TTFR p50':>9s} "
                 f"{'e2e TTFR':>9s} {'listen':>8s} {'@2000':>8s} {'tok/s':>8s}  status")
    for c in report["cells"]:
        f, ran = c["figures"], c["ran"]
        graphs = "-" if ran["cuda_graphs"] is None else ("on" if ran["cuda_graphs"] else "off")
        status = c["status"] + (f": {c['error']}" if c.get("error") else "")
        if c.get("skipped"):
            status += f" (not measured: {', '.join(c['skipped'])})"
        lines.append(f"  {c['precision']:9s} {c['profile']:12s} {(ran['providers'] or ['-'])[0]:22s} {graphs:6s} "
                     f"{_num(f['ttfr_p50_ms']):>9s} {_num(f['ttfr_end_to_end_p50_ms']):>9s} "
                     f"{_num(f['listening_step_ms']):>8s} {_num(f['listening_step_at_2000_ms']):>8s} "
                     f"{_num(f['decode_tokens_per_s'], 1):>8s}  {status}")
    lines.append("  (ms; TTFR p50: encoder + listening step + first token on a stream; e2e: through a Session "
                 "in real time; listen: mel + encoder + decoder step per chunk; @2000: with ~2000 tokens cached)")
    peer = report.get("peer") or {}
    if peer.get("figures"):
        f, ran = peer["figures"], peer["ran"]
        lines.append(f"  PyTorch eager peer (transformers {ran['transformers']}, {ran['dtype']}, SDPA) on {ran['device']}: "
                     f"listen {_num(f['listening_step_ms'].get('median'))} ms, {_num(f['decode_tokens_per_s'], 1)} tok/s")
    elif peer:
        lines.append(f"  PyTorch eager peer: {peer['status']}" + (f": {peer['error']}" if peer.get("error") else ""))
    for precision, entry in (report.get("streams") or {}).items():
        ran = (entry["ran"].get("providers") or ["-"])[0]
        counts = ", ".join(f"{row['streams']}: {_num(row['ttfr_ms'].get('p99'), 1)}"
                           + ("" if row["real_time"] else " (missed)") for row in entry.get("counts") or [])
        status = entry["status"] + (f": {entry['error']}" if entry.get("error") else "")
        lines.append(f"  streams {precision} / {entry['profile']} on {ran}: streams_real_time="
                     f"{entry.get('streams_real_time')}  [streams: p99 TTFR ms] {counts or '-'}  {status}")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write (default gpu_check.json)")
    p.add_argument("--work", default="/tmp/listenloop-gpu-check",
                   help="checkpoint and packages, reused when present (default /tmp/listenloop-gpu-check)")
    p.add_argument("--dims", choices=("real", "tiny"), default="real",
                   help="real dimensions (default) or the tiny test model")
    p.add_argument("--layers", type=int, default=36,
                   help="decoder layers with --dims real (default 36, the real count)")
    p.add_argument("--precisions", default="fp16,int4", help="comma-separated (default fp16,int4)")
    p.add_argument("--profiles", default="cuda,cuda-graphs", help="comma-separated profile names or .json files "
                                                                 "(default cuda,cuda-graphs)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run (tests, or a first look)")
    p.add_argument("--max-context", type=int, default=4096, help="KV capacity of the exported packages (default 4096)")
    p.add_argument("--deadline", type=float, default=465.0,
                   help="seconds after which no new step starts and a running one is stopped (default 465, "
                        "inside check.sh's 480)")
    for key, help_ in (("chunks", "listening chunks timed"), ("rounds", "replies timed"),
                       ("reply_tokens", "tokens per scripted reply"), ("context_steps", "steps timed at ~2000 tokens"),
                       ("session_chunks", "chunks of the real-time Session run (0 skips it)"),
                       ("cell_seconds", "time budget of one cell's measurements, after its model load")):
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None,
                       help=f"{help_} (default {FULL[key]}; --quick {QUICK[key]})")
    p.add_argument("--stream-counts", default=STREAM_COUNTS,
                   help=f"streams per decoder call to try with the slot decoder (default {STREAM_COUNTS}; "
                        "\"\" skips them and exports without the slot decoder)")
    p.add_argument("--stream-precisions", default=STREAM_PRECISIONS,
                   help=f"precisions whose packages get the slot decoder and a streams run, of "
                        f"{', '.join(SLOT_PRECISIONS)} (default {STREAM_PRECISIONS}: int4 as well adds its slot "
                        "decoder's export and a second streams run to the check's time)")
    p.add_argument("--streams-context", type=int, default=1024,
                   help="KV capacity of each stream in the streams runs (default 1024)")
    p.add_argument("--summary", metavar="JSON", help="print the table of a finished run's JSON and exit")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: one step in a child process
    args = p.parse_args(argv)
    args.precisions = [x for x in args.precisions.split(",") if x]
    args.profiles = [x for x in args.profiles.split(",") if x]
    args.stream_precisions = [x for x in args.stream_precisions.split(",") if x]
    if any(x not in SLOT_PRECISIONS for x in args.stream_precisions):
        p.error(f"--stream-precisions takes {', '.join(SLOT_PRECISIONS)}, got {','.join(args.stream_precisions)}")
    try:
        args.stream_counts = sorted({int(x) for x in args.stream_counts.split(",") if x.strip()})
    except ValueError:
        p.error(f"--stream-counts takes comma-separated whole numbers, got {args.stream_counts!r}")
    if any(n < 1 for n in args.stream_counts):
        p.error("--stream-counts must be >= 1 each")
    if not args.precisions or not args.profiles:
        p.error("--precisions and --profiles need at least one name each")
    bad = [x for x in args.precisions if x not in PRECISIONS]
    if bad or args.layers < 1:
        p.error(f"unknown precision {bad[0]!r}" if bad else "--layers must be >= 1")
    return args


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally`: the JSON is written, the child killed


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.job:
        return run_job(args.job)
    if args.summary:
        print(summary(json.loads(Path(args.summary).read_text()), args.summary))
        return 0
    check = Check(args, shlex.join(["python", "bench/gpu_check.py", *argv]))
    signal.signal(signal.SIGTERM, _terminated)
    status = 0
    try:
        check.run()
    except BaseException as exc:  # noqa: BLE001 - one line in the JSON, never a lost run
        stopped = isinstance(exc, SystemExit)
        check.report["error"] = f"stopped by signal (exit {exc.code})" if stopped else one_line(exc)
        for cell in check.report["cells"]:
            if cell["status"] == "pending":
                cell.update(status="skipped", error="the check stopped before this cell")
        for entry in check.report["streams"].values():
            if entry["status"] == "pending":
                entry.update(status="skipped", error="the check stopped before the streams run")
        status = exc.code if stopped and isinstance(exc.code, int) else 1
    finally:
        check.save()
    print(summary(check.report, check.out))
    return status


if __name__ == "__main__":
    sys.exit(main())
