"""listenloop's decoder step against onnxruntime-genai's model of the same weights, side by side.

    pip install "onnxruntime-genai==0.18.*"
    python bench/side_by_side.py --checkpoint CKPT --hf-dir /tmp/sbs/hf --genai-dir /tmp/sbs/genai \\
        --package PKG_INT8 PKG_INT4 [--package-old OLD_INT8 OLD_INT4] \\
        --context 500,2000,4000 --steps 1,13 --rounds 10 --json sbs.json --plot sbs.png

Preparation (each part is skipped when its output is already there; `--build-only` stops here;
once the genai models are built, neither --checkpoint nor --hf-dir is needed):

1. `--hf-dir`: the checkpoint's LM as a Hugging Face Qwen2 folder: config.json,
   generation_config.json, the tokenizer files and float32 `model-*.safetensors` shards of
   about 2 GB (embedding and lm_head included) written one at a time, plus their index
   (12.7 GB for the 3B model, about a minute).
2. `--genai-dir`: onnxruntime-genai's builder run on it once per precision of the packages:
   `python -m onnxruntime_genai.models.builder -i HF -o GENAI/int4 -p int4 -e cpu -c GENAI/cache
   --extra_options exclude_embeds=true prune_lm_head=true` (and `-p int8`). exclude_embeds makes
   its graph take `inputs_embeds` as ours does; prune_lm_head makes it compute the last row's
   logits only, as ours does with `logits_index` (`--genai-options` sets other options). The
   command, its time and its memory go to `GENAI/PRECISION/sbs_build.json` with a summary of
   the graph (op counts, MatMulNBits and GroupQueryAttention attributes, KV cache mode). About
   1.5 min per precision on 2 cores; the builder maps the float32 weights and holds a float32
   copy of the graph while it quantizes (at the lowest 5 GB of 24 stayed free), so it is the
   first process to kill and stopped when less than 1 GB of memory is left.
   For the genai runtime, `GENAI/PRECISION-ids` is the same graph with the embedding Gather put
   back (an `input_ids` input; the table is read from the hard-linked safetensors shard, and
   the other weights are hard-linked too: no copies on disk).

What is timed, for each precision (read from the packages' manifests), cached length P
(`--context`) and step size T (`--steps`); the stream's position is set to P directly, since
the cache contents change nothing but P does:

- listenloop, T=13, the listening step: `DecoderStream.listen` of one chunk of [10, 2048]
  random audio vectors (staging, bindings, the decoder call, the speak/silence decision);
- listenloop, T=1, a reply token: `DecoderStream.speak_step` (the decoder call and greedy
  sampling over the vocabulary);
- genai's graph, run directly on the same ONNX Runtime with the session options of
  listenloop's "cpu" profile (one intra-op thread per physical core, no spinning, sequential,
  all optimizations), through IOBinding: inputs_embeds [1, T, H] and attention_mask [1, P+T]
  of ones; the KV cache as genai's runtime keeps it on the CPU (genai_config.json's
  past_present_share_buffer, true for 0.18's CPU builds): one random [1, KVH, --max-context, D]
  buffer per layer and K/V, bound as both past and present, written in place
  (`--genai-kv separate` instead binds past [1, KVH, P, D] and lets ORT allocate present);
  logits allocated by ORT. Only `run_with_iobinding` is timed: no genai runtime, no sampling.

`--package-old` adds a third contender, timed as listenloop, "listenloop (previous graph)".
Each round times every contender once, in turn, after 2 warm-up calls each; figures are the
medians of `--rounds` rounds, in ms. One precision's contenders are loaded at a time. Before
timing, each listenloop contender's first step (prompt + one chunk) is fed to genai's graph
too, and the two logits rows are compared: the same weights give a correlation near 1.

genai through its own runtime (`--genai-runtime PRECISION:P:T,...`, default int4 at P=500,
T=1 and T=13): an `onnxruntime_genai` Generator on `PRECISION-ids` (the runtime feeds token
ids), with genai's own session options (genai_config.json sets none: ONNX Runtime's defaults,
intra-op spinning on) and its own KV cache handling. A prompt of P random tokens is prefilled
once; each timed call is `rewind_to(P)` + `append_tokens` of T tokens, so every call sees P
cached tokens. Reported next to the direct timing of the same cell, and as red crosses in the
plot.

Output: a markdown table (listenloop, previous graph, genai graph, listenloop / genai),
`--json` with every median and round, the agreement check, the builds and the environment
(CPU, ONNX Runtime and genai versions, load average, the command line), `--plot` a PNG of
step time against cached tokens, one panel per (precision, T).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

NEVER_SPEAK = -50.0
SHARD_BYTES = 2 * 2**30
DEFAULT_GENAI_OPTIONS = "exclude_embeds=true prune_lm_head=true"
LABELS = {"new": "listenloop", "old": "listenloop (previous graph)", "genai": "onnxruntime-genai graph"}
MIN_FREE_BYTES = 1 * 2**30  # the builder is stopped below this much available memory


# --- 1. Hugging Face folder -----------------------------------------------------------------

def hf_folder_complete(folder: Path) -> bool:
    """The index and every shard it names are there (shards alone may have been deleted for space)."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return False
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((folder / shard).is_file() for shard in shards)


def write_hf_folder(checkpoint: str, out: Path) -> None:
    """The checkpoint's LM as a Hugging Face Qwen2 folder, one ~2 GB shard in memory at a time."""
    from safetensors.torch import save_file

    from listenloop.export.checkpoint import load_checkpoint

    if hf_folder_complete(out):
        print(f"{out}: Hugging Face folder already there")
        return
    (out / "model.safetensors.index.json").unlink(missing_ok=True)  # written last: marks a complete folder
    ck = load_checkpoint(checkpoint, lazy=True)
    state = ck.lm_state
    out.mkdir(parents=True, exist_ok=True)
    config = ck.hf_qwen2_config
    config.architectures = ["Qwen2ForCausalLM"]
    config.dtype = "float32"
    config.bos_token_id = config.eos_token_id = config.pad_token_id = ck.tokens["TEXT_END"]
    config.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ck.tokens["TEXT_END"], "eos_token_id": ck.tokens["TEXT_END"],
         "pad_token_id": ck.tokens["TEXT_END"], "do_sample": False}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ck.path / name, out / name)

    groups, current, size = [], [], 0
    for key in state:
        nbytes = int(np.prod(state.shape(key))) * 4
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        # q/k/v are row slices of one fused tensor: clone so no two tensors share storage
        tensors = {key: state[key].clone() for key in keys}
        total += sum(t.numel() * 4 for t in tensors.values())
        save_file(tensors, str(out / f"{name}.tmp"), metadata={"format": "pt"})
        os.replace(out / f"{name}.tmp", out / name)
        weight_map.update({key: name for key in keys})
        print(f"  wrote {name} ({len(keys)} tensors)", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    print(f"{out}: Hugging Face Qwen2 folder written ({total / 2**30:.1f} GiB)")


# --- 2. onnxruntime-genai models ------------------------------------------------------------

def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def _most_killable():
    # If memory runs out anyway, the kernel should kill the builder, not anything else.
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def build_genai(hf_folder, genai_dir: Path, precision: str, options: str) -> dict:
    """Run the builder for one precision unless its model is there; the build record.
    `hf_folder()` gives the Hugging Face folder, written on first use."""
    out = genai_dir / precision
    record_path = out / "sbs_build.json"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", "HF_DIR", "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(genai_dir / "cache")]
    if options:
        cmd += ["--extra_options", *options.split()]
    if (out / "model.onnx").is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        built = record["command"].split()
        if built[1:4] + built[5:] != cmd[1:4] + cmd[5:]:  # the same but for python and the HF folder
            raise SystemExit(f"{out} was built by another command ({record['command']}); remove it or use another --genai-dir")
        return record
    cmd[4] = str(hf_folder())
    print("building:", " ".join(cmd), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    started, low = time.perf_counter(), [2**62]
    with open(out / "sbs_build.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_most_killable)

        def watch():  # stop the build before the machine runs out of memory
            while proc.poll() is None:
                free = _available_memory()
                low[0] = min(low[0], free)
                if free < MIN_FREE_BYTES:
                    proc.kill()
                    print(f"builder stopped: only {free / 2**30:.1f} GiB of memory left", flush=True)
                time.sleep(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = proc.wait()
        watcher.join()
    seconds = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"builder failed (exit {rc}); see {out / 'sbs_build.log'}")
    record = {"command": " ".join(cmd), "seconds": round(seconds, 1),
              "peak_rss_gib_with_mapped_weights": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
              "min_available_gib": round(low[0] / 2**30, 2), "graph": graph_summary(out / "model.onnx")}
    record_path.write_text(json.dumps(record, indent=2))
    print(f"built {out} in {seconds / 60:.1f} min", flush=True)
    return record


def graph_summary(path: Path) -> dict:
    """Op counts and the attributes that decide speed (GroupQueryAttention, MatMulNBits)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops, nbits, gqa = {}, set(), set()
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            nbits.add(tuple(sorted((k, attrs[k]) for k in ("bits", "block_size", "accuracy_level") if k in attrs)))
        elif node.op_type == "GroupQueryAttention":
            gqa.add(tuple(sorted((k, v if not isinstance(v, bytes) else v.decode()) for k, v in attrs.items())))
    genai_config = json.loads((path.parent / "genai_config.json").read_text())
    decoder = genai_config["model"]["decoder"]
    return {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "MatMulNBits": [dict(a) for a in sorted(nbits)], "GroupQueryAttention": [dict(a) for a in sorted(gqa)],
            "inputs": [i.name for i in model.graph.input][:4] + ["..."],
            "outputs": [o.name for o in model.graph.output][:3] + ["..."],
            "past_present_share_buffer": genai_config["search"].get("past_present_share_buffer"),
            "session_options": decoder.get("session_options", {})}


def with_input_ids(hf_folder, genai_dir: Path, precision: str) -> Path:
    """A copy of the built model that takes input_ids (the embedding Gather put back), for the
    genai runtime, which feeds token ids. Weights are hard-linked, not copied."""
    import onnx
    from onnx import TensorProto, helper

    src, out = genai_dir / precision, genai_dir / f"{precision}-ids"
    if (out / "model.onnx").is_file():
        return out
    hf_dir = hf_folder()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("model.onnx", "genai_config.json") and f.is_file() and not f.name.startswith("sbs_"):
            os.link(f, tmp / f.name)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    graph = model.graph
    embeds = next(i for i in graph.input if i.name == "inputs_embeds")
    # The table is read where it lies in the Hugging Face shard (hard-linked): no copy on disk.
    name = "model.embed_tokens.weight"
    shard = hf_dir / json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"][name]
    with open(shard, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(header_len))[name]
    if entry["dtype"] != "F32":
        raise SystemExit(f"{shard}: {name} is {entry['dtype']}, not F32")
    begin, end = entry["data_offsets"]
    os.link(shard, tmp / "embed_tokens.safetensors")
    init = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=entry["shape"], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "embed_tokens.safetensors"), ("offset", str(8 + header_len + begin)),
                       ("length", str(end - begin))):
        init.external_data.add(key=key, value=value)
    graph.initializer.append(init)
    dims = [d.dim_param or d.dim_value for d in embeds.type.tensor_type.shape.dim][:2]
    graph.input.remove(embeds)
    graph.input.insert(0, helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims))
    graph.node.insert(0, helper.make_node("Gather", [name, "input_ids"], ["inputs_embeds"],
                                          name="/model/embed_tokens/Gather"))
    onnx.save(model, str(tmp / "model.onnx"))
    config = json.loads((src / "genai_config.json").read_text())
    inputs = config["model"]["decoder"]["inputs"]
    inputs.pop("inputs_embeds", None)
    inputs["input_ids"] = "input_ids"
    (tmp / "genai_config.json").write_text(json.dumps(config, indent=4))
    tmp.rename(out)
    return out


# --- 3. timing --------------------------------------------------------------------------------

def _ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - started)


class ListenloopStep:
    """One package's decoder step through DecoderStream (what the runtime does every step)."""

    def __init__(self, package: str, max_context: int):
        from listenloop.model import Model

        self.model = Model(package, "cpu", max_context=max_context)
        self.stream = self.model.stream(speak_bias=NEVER_SPEAK, quiet_resets=False)
        self.vectors = np.random.default_rng(0).standard_normal((10, self.model.hidden), dtype=np.float32)
        self.reply_token = 1000  # any ordinary token id

    def check(self, P: int) -> None:
        if self.stream.context.must_reset(P, 13):
            raise SystemExit(f"P={P} leaves no room for a step and the reply reserve in a capacity of "
                             f"{self.stream.capacity}: raise --max-context")

    def prepare(self, P: int, T: int):
        stream, silence = self.stream, self.stream.tokens["KEEP_SILENCE"]
        if T == 13:
            def call():
                stream._position, stream._previous = P, silence
                result = stream.listen(self.vectors)
                assert result.position == P + 13 and result.context_reset is None and not result.spoke
        elif T == 1:
            def call():
                stream._position, stream._previous = P, self.reply_token
                stream._speaking, stream._reply_left = True, 10
                stream.speak_step()
                assert stream.position == P + 1
                stream._speaking = False
        else:
            raise ValueError(f"listenloop steps are T=1 (reply token) or T=13 (listening step), not {T}")
        return call

    def first_call(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs_embeds [T, H], logits [V]) of a fresh stream's first listening step (the
        prompt and one chunk, P=0): the same numbers fed to genai's graph show both hold the
        same weights."""
        self.stream.reset()
        result = self.stream.listen(self.vectors)
        embeds = np.array(self.stream.last_inputs()["inputs_embeds"], dtype=np.float32)
        return embeds, np.array(result.logits, dtype=np.float32)

    def close(self):
        del self.stream, self.model


class GenaiGraphStep:
    """genai's graph run directly on ONNX Runtime with listenloop's "cpu" session options.

    KV cache as genai's runtime keeps it: with past_present_share_buffer (genai_config.json),
    one [1, KVH, capacity, D] buffer per layer bound as both past and present (the graph
    writes the new rows in place); without it, past [1, KVH, P, D] and present allocated by ORT
    (the graph copies past into present every call)."""

    def __init__(self, model_dir: Path, capacity: int, kv_mode: str = "config"):
        import onnxruntime as ort

        from listenloop.profiles import load_profile, provider_arguments, resolve_providers, session_options

        profile = resolve_providers(load_profile("cpu"))
        names, options = provider_arguments(profile)
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), sess_options=session_options(profile),
                                            providers=names, provider_options=options)
        config = json.loads((model_dir / "genai_config.json").read_text())
        self.shared = bool(config["search"].get("past_present_share_buffer")) if kv_mode == "config" else kv_mode == "shared"
        decoder = config["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
        self.hidden, self.capacity = decoder["hidden_size"], capacity
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.rng = np.random.default_rng(1)
        self._kv_P, self._kv = None, None
        if self.shared:  # contents do not matter, only P does
            self._kv = self.rng.standard_normal((2 * self.layers, 1, self.kv_heads, capacity, self.head_dim),
                                                dtype=np.float32)

    def _kv_index(self, name: str) -> int:
        layer, kind = name.split(".")[-2:] if name.startswith("present.") else name.split(".")[1:3]
        return 2 * int(layer) + (kind == "value")

    def check(self, P: int) -> None:
        if P + 13 > self.capacity:
            raise SystemExit(f"P={P} does not fit in --max-context {self.capacity}")

    def prepare(self, P: int, T: int):
        if not self.shared and self._kv_P != P:  # [1, KVH, P, D] per layer, keys and values
            self._kv = None
            self._kv = [self.rng.standard_normal((1, self.kv_heads, P, self.head_dim), dtype=np.float32)
                        for _ in range(2 * self.layers)]
            self._kv_P = P
        io = self.session.io_binding()
        feeds = {"attention_mask": np.ones((1, P + T), np.int64),
                 "inputs_embeds": self.rng.standard_normal((1, T, self.hidden), dtype=np.float32),
                 "input_ids": np.full((1, T), 1000, np.int64),
                 "position_ids": np.arange(P, P + T, dtype=np.int64)[None]}
        for name in self.inputs:
            if name.startswith("past_key_values."):
                kv = self._kv[self._kv_index(name)]
                io.bind_input(name, "cpu", 0, np.float32, list(kv.shape), kv.ctypes.data)
            elif name in feeds:
                io.bind_cpu_input(name, feeds[name])
            else:
                raise SystemExit(f"genai graph input {name!r} is not known to this harness")
        for name in self.outputs:
            if self.shared and name.startswith("present."):
                kv = self._kv[self._kv_index(name)]
                io.bind_output(name, "cpu", 0, np.float32, list(kv.shape), kv.ctypes.data)
            else:
                io.bind_output(name, "cpu")
        self._feeds = feeds  # the bound arrays must outlive the binding
        return lambda: self.session.run_with_iobinding(io)

    def last_logits(self, embeds: np.ndarray) -> np.ndarray:
        """Last-row logits of [T, H] embeddings with an empty cache."""
        feeds = {"inputs_embeds": embeds[None], "attention_mask": np.ones((1, len(embeds)), np.int64)}
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        feeds.update({name: empty for name in self.inputs if name.startswith("past_key_values.")})
        logits = self.session.run(["logits"], feeds)[0]
        return logits.reshape(-1, logits.shape[-1])[-1]

    def close(self):
        del self.session, self._kv


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """How close two logits rows are (quantized graphs of the same weights: close, not equal)."""
    return {"max_abs_diff": float(np.abs(ours - theirs).max()), "max_abs": float(np.abs(ours).max()),
            "correlation": float(np.corrcoef(ours, theirs)[0, 1]), "same_argmax": bool(ours.argmax() == theirs.argmax())}


def genai_runtime_cells(model_dir: Path, P: int, steps: list, rounds: int) -> dict:
    """{T: median ms of `append_tokens` of T tokens at P cached tokens} through onnxruntime_genai."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=P + max(steps) + 1, do_sample=False)
    generator = og.Generator(model, params)
    rng = np.random.default_rng(2)
    print(f"  genai runtime: prefilling {P} tokens", flush=True)
    prefill = _ms(lambda: generator.append_tokens(rng.integers(1000, 100000, P, dtype=np.int64)[None]))
    cells = {}
    for T in steps:
        tokens = rng.integers(1000, 100000, T, dtype=np.int64)[None]

        def call():
            generator.rewind_to(P)  # every call sees P cached tokens
            generator.append_tokens(tokens)
            assert generator.token_count() == P + T

        call(), call()
        times = [_ms(call) for _ in range(rounds)]
        cells[T] = {"median_ms": float(np.median(times)), "times_ms": times}
        print(f"  genai runtime T={T:2d} P={P:5d}: {cells[T]['median_ms']:8.1f} ms", flush=True)
    del generator, params, model
    return {"P": P, "prefill_ms": prefill, "steps": cells}


def time_precision(contenders: dict, contexts: list, steps: list, rounds: int) -> dict:
    """{T: {P: {contender: median ms}}}, rounds interleaved across contenders."""
    for contender in contenders.values():
        for P in contexts:
            contender.check(P)
    results = {}
    for T in steps:
        for P in contexts:
            calls = {name: c.prepare(P, T) for name, c in contenders.items()}
            for call in calls.values():
                call(), call()
            times = {name: [] for name in calls}
            for _ in range(rounds):
                for name, call in calls.items():
                    times[name].append(_ms(call))
            medians = {name: float(np.median(t)) for name, t in times.items()}
            results.setdefault(T, {})[P] = {"median_ms": medians, "times_ms": times}
            print(f"  T={T:2d} P={P:5d}: " + "  ".join(f"{n} {m:8.1f} ms" for n, m in medians.items()), flush=True)
    return results


# --- 4. output ----------------------------------------------------------------------------------

def environment() -> dict:
    import onnxruntime as ort

    try:
        import onnxruntime_genai as og

        genai_version = og.__version__
    except ImportError:
        genai_version = None
    from listenloop.benchmarks.machine import cpu_model, total_memory_bytes
    from listenloop.profiles import physical_cores

    memory = total_memory_bytes()
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "memory_gib": None if memory is None else round(memory / 2**30, 1),
            "onnxruntime": ort.__version__, "onnxruntime_genai": genai_version, "python": platform.python_version(),
            "load_average": os.getloadavg()}


def table(results: dict) -> str:
    has_old = any("old" in cell["median_ms"] for prec in results.values() for by_p in prec.values()
                  for cell in by_p.values())
    head = ["precision", "T", "P", "listenloop (ms)"] + (["previous graph (ms)"] if has_old else []) + \
        ["genai graph (ms)", "listenloop / genai"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for precision, by_t in results.items():
        for T, by_p in by_t.items():
            for P, cell in by_p.items():
                m = cell["median_ms"]
                row = [precision, str(T), str(P), f"{m['new']:.1f}"]
                if has_old:
                    row.append(f"{m['old']:.1f}" if "old" in m else "")
                row += [f"{m['genai']:.1f}", f"{m['new'] / m['genai']:.2f}"]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str, runtime_cells: list = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(results)
    steps = sorted({T for by_t in results.values() for T in by_t})
    fig, axes = plt.subplots(len(precisions), len(steps), figsize=(5.2 * len(steps), 3.8 * len(precisions)),
                             squeeze=False)
    styles = {"old": ("tab:gray", "--"), "new": ("tab:blue", "-"), "genai": ("tab:orange", "-")}
    for (row, prec), (col, T) in ((r, c) for r in enumerate(precisions) for c in enumerate(steps)):
        ax = axes[row][col]
        if T not in results[prec]:
            ax.set_visible(False)
            continue
        by_p = results[prec][T]
        contexts = sorted(by_p)
        for name in ("old", "new", "genai"):
            if all(name in by_p[P]["median_ms"] for P in contexts):
                color, line = styles[name]
                ax.plot(contexts, [by_p[P]["median_ms"][name] for P in contexts], line, color=color, marker="o",
                        label=LABELS[name])
        cells = [c for c in runtime_cells if c["precision"] == prec and c["T"] == T]
        if cells:
            ax.plot([c["P"] for c in cells], [c["median_ms"] for c in cells], "x", color="tab:red", markersize=9,
                    label="onnxruntime-genai runtime")
        ax.set_title(f"{prec}, T={T} ({'listening step' if T == 13 else 'reply token' if T == 1 else 'step'})")
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("decoder step (ms, median)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------

def _precision(package: str) -> str:
    return json.loads((Path(package) / "manifest.json").read_text())["decoder"]["precision"]


def _runtime_cells(spec: str) -> dict:
    """"int4:500:1,int4:500:13" -> {("int4", 500): [1, 13]}"""
    cells = {}
    for item in filter(None, spec.split(",")):
        precision, P, T = item.split(":")
        cells.setdefault((precision, int(P)), []).append(int(T))
    return cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="release-layout checkpoint (needed to write --hf-dir)")
    p.add_argument("--hf-dir", default=None,
                   help="Hugging Face Qwen2 folder (written from --checkpoint if missing; only builds need it)")
    p.add_argument("--genai-dir", required=True, help="onnxruntime-genai models, one folder per precision")
    p.add_argument("--genai-options", default=DEFAULT_GENAI_OPTIONS, help="the builder's --extra_options")
    p.add_argument("--package", nargs="+", default=[], help="listenloop packages, one per precision")
    p.add_argument("--package-old", nargs="+", default=[], help="previous-format packages of the same precisions")
    p.add_argument("--context", default="500,2000,4000", help="cached tokens P")
    p.add_argument("--steps", default="1,13", help="step sizes T: 1 (reply token), 13 (listening step)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-context", type=int, default=4608,
                   help="listenloop's capacity and genai's KV buffer length (>= P + 13 + reply reserve)")
    p.add_argument("--genai-kv", choices=("config", "shared", "separate"), default="config",
                   help="genai graph's KV cache: as its genai_config.json says (default), or forced")
    p.add_argument("--genai-runtime", default="int4:500:1,int4:500:13",
                   help="PRECISION:P:T cells also timed through the onnxruntime_genai Generator ('' for none)")
    p.add_argument("--build-only", action="store_true", help="prepare the folders and stop")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)

    genai_dir = Path(args.genai_dir)

    def hf_folder() -> Path:  # only a build reads it: built models need neither it nor the checkpoint
        if not args.hf_dir:
            p.error("a genai model must be built: give --hf-dir (and --checkpoint to write it)")
        hf_dir = Path(args.hf_dir)
        if not hf_folder_complete(hf_dir):
            if not args.checkpoint:
                p.error(f"{hf_dir} has no Hugging Face model: give --checkpoint to write it")
            write_hf_folder(args.checkpoint, hf_dir)
        return hf_dir

    packages = {_precision(pkg): pkg for pkg in args.package}
    old = {_precision(pkg): pkg for pkg in args.package_old}
    unmatched = sorted(set(old) - set(packages))
    if unmatched:
        p.error(f"--package-old precision(s) {', '.join(unmatched)} have no --package of the same precision")
    builds = {prec: build_genai(hf_folder, genai_dir, prec, args.genai_options) for prec in packages}
    runtime_cells = {key: steps for key, steps in _runtime_cells(args.genai_runtime).items() if key[0] in packages}
    for precision in {prec for prec, _ in runtime_cells}:
        with_input_ids(hf_folder, genai_dir, precision)
    if args.build_only:
        return 0

    contexts = [int(x) for x in args.context.split(",")]
    steps = [int(x) for x in args.steps.split(",")]
    command = "python bench/side_by_side.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "environment": environment(), "builds": builds, "packages": packages,
              "old_packages": old, "rounds": args.rounds, "max_context": args.max_context, "genai_kv": args.genai_kv,
              "agreement": {}, "results": {}, "genai_runtime": []}
    print(f"command: {command}")
    for precision, package in packages.items():
        print(f"{precision}: loading", flush=True)
        contenders = {}
        if precision in old:
            contenders["old"] = ListenloopStep(old[precision], args.max_context)
        contenders["new"] = ListenloopStep(package, args.max_context)
        genai = contenders["genai"] = GenaiGraphStep(genai_dir / precision, args.max_context, args.genai_kv)
        for name in ("old", "new"):
            if name in contenders:
                embeds, logits = contenders[name].first_call()
                check = report["agreement"].setdefault(precision, {})[name] = agreement(logits, genai.last_logits(embeds))
                print(f"  same weights? {LABELS[name]} vs genai, first step's logits: correlation "
                      f"{check['correlation']:.5f}, max |diff| {check['max_abs_diff']:.3f} of {check['max_abs']:.2f}, "
                      f"same argmax {check['same_argmax']}", flush=True)
        report["results"][precision] = time_precision(contenders, contexts, steps, args.rounds)
        for c in contenders.values():
            c.close()
        del contenders, genai
        gc.collect()
        for (prec, P), cell_steps in runtime_cells.items():
            if prec == precision:
                cells = genai_runtime_cells(genai_dir / f"{precision}-ids", P, cell_steps, args.rounds)
                for T, cell in cells["steps"].items():
                    direct = report["results"][precision].get(T, {}).get(P)
                    report["genai_runtime"].append({
                        "precision": precision, "P": P, "T": T, "median_ms": cell["median_ms"],
                        "times_ms": cell["times_ms"], "prefill_ms": cells["prefill_ms"],
                        "direct_graph_ms": direct["median_ms"]["genai"] if direct else None})
                gc.collect()

    report["environment"]["load_average_end"] = os.getloadavg()
    print()
    print(table(report["results"]))
    if report["genai_runtime"]:
        print("\nonnxruntime-genai through its own runtime (Generator.append_tokens after rewind_to), "
              "against its graph timed directly:")
        for cell in report["genai_runtime"]:
            direct = f"{cell['direct_graph_ms']:.1f} ms" if cell["direct_graph_ms"] else "not timed"
            print(f"  {cell['precision']} T={cell['T']} P={cell['P']}: runtime {cell['median_ms']:.1f} ms, graph {direct}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    if args.plot:
        plot(report["results"], args.plot, report["genai_runtime"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
