"""Post-export precision conversion of an fp32 graph: fp16, int8 (dynamic), int4 (MatMulNBits).

fp16 keeps the numerically fragile parts in float32: the RoPE angle computation (positions
reach 4096, where float16 angles would be off by up to half a radian), RMSNorm/LayerNorm
statistics, and softmax. The encoder keeps float32 I/O at every precision; an fp16 decoder
takes and returns float16 embeddings and KV, but its logits stay float32 (contract).
int8/int4 quantize MatMul weights only; activations, I/O and KV stay float32.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx
from onnx import TensorProto

from listenloop.errors import ExportError
from listenloop.protocol import PRECISIONS

from .external import ExternalDataWriter, is_external, read_array, save_graph, tensor_nbytes

LARGE_MODEL_BYTES = 1_800_000_000
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations in the CPU MatMulNBits kernel
# Ops whose float16 versions lose too much (statistics and sums over a row, e.g. the softmax
# denominator over thousands of cached keys, exponentials).
FP16_OP_BLOCK_LIST = ["Pow", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Softmax", "Cos", "Sin", "Range",
                      "LayerNormalization", "Erf"]


def quantization_record(precision: str) -> dict | None:
    """The manifest's `quantization` entry for a precision."""
    if precision == "int4":
        return {"method": "MatMulNBits", "bits": 4, "block_size": INT4_BLOCK_SIZE,
                "accuracy_level": INT4_ACCURACY_LEVEL, "symmetric": True}
    if precision == "int8":
        return {"method": "DynamicQuantizeLinear", "bits": 8, "weight_type": "QInt8", "per_channel": True}
    return None


def _upstream_of(graph, outputs: set, stop: set) -> list:
    """Names of nodes that feed `outputs`, walking back until a graph input in `stop`."""
    producer = {out: node for node in graph.node for out in node.output}
    seen, names, todo = set(), [], list(outputs)
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.append(node.name)
        todo.extend(i for i in node.input if i not in stop)
    return names


def _rope_nodes(model: onnx.ModelProto) -> list:
    """Every node on the path position_ids -> Cos/Sin (kept float32 in fp16 graphs)."""
    graph = model.graph
    trig = {out for node in graph.node if node.op_type in ("Cos", "Sin") for out in node.output}
    return _upstream_of(graph, trig, stop={"inputs_embeds"})


def _is_large(model: onnx.ModelProto) -> bool:
    """Above protobuf's 2 GB single-message limit (with margin)."""
    try:
        return model.ByteSize() > LARGE_MODEL_BYTES
    except (ValueError, RuntimeError):  # some protobuf builds refuse to size > 2 GB messages
        return True


def _save(model: onnx.ModelProto, path: Path) -> None:
    if _is_large(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def drop_duplicate_casts(model: onnx.ModelProto) -> int:
    """Remove every Cast node that repeats an earlier one (same input, same `to`, same output
    name), and the repeated value_info of its output; returns how many nodes went.

    Why: ORT's fp16 converter in some versions (1.30, 1.31) inserts one Cast per consumer when a
    float16 tensor feeds two ops kept in float32 (e.g. one angle tensor into Cos and Sin), all
    with one node name and one output name, and ONNX Runtime then refuses to load the graph
    ("two nodes with same node name"). Every consumer already reads that output name, so the
    first Cast serves them all."""
    graph = model.graph
    seen, repeats = set(), []
    for index, node in enumerate(graph.node):
        if node.op_type != "Cast" or len(node.input) != 1 or len(node.output) != 1:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        key = (node.input[0], to, node.output[0])
        if key in seen:
            repeats.append(index)
        seen.add(key)
    dropped_outputs = {graph.node[i].output[0] for i in repeats}
    for index in reversed(repeats):
        del graph.node[index]
    described, value_repeats = set(), []
    for index, value in enumerate(graph.value_info):
        if value.name in dropped_outputs:
            if value.name in described:
                value_repeats.append(index)
            described.add(value.name)
    for index in reversed(value_repeats):
        del graph.value_info[index]
    return len(repeats)


def to_fp16(src: Path, dst: Path, keep_float32_io: list) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    blocked_nodes = _rope_nodes(model)
    # ONNX shape inference cannot take an in-memory model above 2 GB; the converter then relies
    # on the value_info the exporter already wrote.
    converted = convert_float_to_float16(model, keep_io_types=keep_float32_io, op_block_list=FP16_OP_BLOCK_LIST,
                                         node_block_list=blocked_nodes, disable_shape_infer=_is_large(model))
    drop_duplicate_casts(converted)
    _save(converted, dst)


def _int8_dynamic(src: Path, dst: Path, external_data: bool) -> None:
    """ORT's dynamic int8 quantization of every MatMul with a constant weight: the one setting
    both the whole-model and the streamed path use."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=external_data,
                     extra_options={"MatMulConstBOnly": True})


def _int4_quantized(model) -> onnx.ModelProto:
    """ORT's MatMulNBits quantization of `model` (a ModelProto or a path) with the manifest's
    block size and accuracy level: the one setting both paths use."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    config = nbits.DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                               accuracy_level=INT4_ACCURACY_LEVEL, bits=4)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                           accuracy_level=INT4_ACCURACY_LEVEL, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def to_int8(src: Path, dst: Path) -> None:
    _int8_dynamic(src, dst, src.stat().st_size > LARGE_MODEL_BYTES or Path(f"{src}.data").exists())


def to_int4(src: Path, dst: Path) -> None:
    _save(_int4_quantized(onnx.load(str(src))), dst)


@contextlib.contextmanager
def _quiet_quantizers():
    """The ORT quantizers log an INFO line per node and a pre-processing hint at WARNING."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def convert(src: Path, dst: Path, precision: str, *, keep_float32_io: list) -> None:
    """Write `dst` at `precision` from the fp32 graph `src` (fp32: a plain copy of the graph).

    Streams: the graph proto is held in memory, the weights one at a time (external.py), so the
    peak is about the largest weight times a small factor, not the model. The result is the
    graph the whole-model converters (`convert_in_memory`) write, initializer for initializer:
    fp16 runs ORT's converter on the graph with its weights left in the source file and then
    converts each weight as ORT would; int8/int4 quantize each MatMul weight with the ORT
    quantizer on a one-node model and splice the nodes it returns into the graph."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: must be one of {PRECISIONS}")
    src, dst = Path(src), Path(dst)
    with _quiet_quantizers():
        model = onnx.load(str(src), load_external_data=False)
        base = src.parent
        with ExternalDataWriter(dst.parent / (dst.name + ".data")) as writer:
            if precision == "fp16":
                model = _fp16_streamed(model, base, writer, keep_float32_io)
            elif precision in ("int8", "int4"):
                _quantize_streamed(model, base, writer, precision, dst.parent)
            else:
                _copy_initializers(model.graph.initializer, base, writer)
        save_graph(model, dst, LARGE_MODEL_BYTES)


def _copy_initializers(initializers, base: Path, writer: ExternalDataWriter, source_types: dict | None = None) -> None:
    """Rewrite every initializer into `writer`'s file, converting float32 -> float16 where the
    (already converted) proto says float16 and `source_types` says float32."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    for tensor in initializers:
        if not is_external(tensor):
            writer.externalize(tensor)
            continue
        source_type = (source_types or {}).get(tensor.name, tensor.data_type)
        if source_type == tensor.data_type:
            tensor.CopyFrom(writer.copy_tensor(tensor, base))
        elif source_type == TensorProto.FLOAT and tensor.data_type == TensorProto.FLOAT16:
            array = read_array(tensor, base, data_type=source_type)
            writer.write_converted(tensor, array, convert_np_to_float16)
            del array
        else:
            raise ExportError(f"{tensor.name}: cannot convert {source_type} to {tensor.data_type}")


def _fp16_streamed(model: onnx.ModelProto, base: Path, writer: ExternalDataWriter, keep_float32_io: list):
    from onnxruntime.transformers import float16

    source_types = {t.name: t.data_type for t in model.graph.initializer}
    blocked_nodes = _rope_nodes(model)
    # ORT's converter only flips the type of a tensor whose data is external; its one read of
    # the values is for a shape, which the dims give. Without the weights the proto is small at
    # any model size, so ONNX shape inference always runs (the in-memory path had to skip it
    # above 2 GB, leaving the converter without the value_info it needs to place its Casts).
    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        converted = float16.convert_float_to_float16(model, keep_io_types=keep_float32_io,
                                                     op_block_list=FP16_OP_BLOCK_LIST, node_block_list=blocked_nodes,
                                                     disable_shape_infer=False)
    finally:
        float16.make_value_info_from_tensor = original
    drop_duplicate_casts(converted)
    _copy_initializers(converted.graph.initializer, base, writer, source_types)
    return converted


def _value_info(model: onnx.ModelProto, name: str):
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if value.name == name:
            return value
    return onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _quantize_streamed(model: onnx.ModelProto, base: Path, writer: ExternalDataWriter, precision: str,
                       scratch_parent: Path) -> None:
    import tempfile

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    available = {v.name for v in graph.input} | set(initializers)
    nodes, added, added_names, opsets = [], [], set(), {}
    with tempfile.TemporaryDirectory(dir=scratch_parent, prefix=".quantize-") as scratch:
        for node in graph.node:
            weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if weight is None:
                nodes.append(node)
                available.update(node.output)
                continue
            quantized = _quantize_one(model, node, weight, base, precision, Path(scratch))
            for new in quantized.graph.node:
                if new.output and all(o in available for o in new.output):
                    continue  # the activation's DynamicQuantizeLinear, shared with an earlier MatMul
                nodes.append(_detached(new))
                available.update(new.output)
            for tensor in quantized.graph.initializer:
                if tensor.name == weight.name:
                    continue  # left unquantized: the source tensor is copied below
                if tensor.name in initializers or tensor.name in added_names:
                    raise ExportError(f"quantizing {node.name}: initializer {tensor.name} exists already")
                writer.externalize(tensor)
                added.append(_detached(tensor))
                added_names.add(tensor.name)
            for opset in quantized.opset_import:
                opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
            model.ir_version = max(model.ir_version, quantized.ir_version)
            del quantized
        used = {name for node in nodes for name in node.input}
        kept = [t for t in graph.initializer if t.name in used]
        _copy_initializers(kept, base, writer)
        # Standalone copies before the fields they live in are cleared (the graph is small now:
        # every large tensor is a reference into the data file).
        nodes = [_detached(n) for n in nodes]
        kept = [_detached(t) for t in kept]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + [t for t in added if t.name in used])
    for opset in model.opset_import:
        opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model.ClearField("opset_import")
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())


def _detached(message):
    """A standalone copy of a proto message. A message taken from another model keeps that whole
    model alive (the protobuf arena), here the one-node model with its float32 weight."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _quantize_one(model: onnx.ModelProto, node, weight, base: Path, precision: str, scratch: Path) -> onnx.ModelProto:
    """Run the ORT quantizer that `convert_in_memory` runs on the whole graph, on a model of this
    one MatMul (same node, tensor and weight names, opsets and IR version); returns its result.
    The weight goes from the source file to the scratch model's file without a detour through
    memory; the quantizer then holds it once."""
    helper = onnx.helper
    mini_node = _detached(node)
    inputs = [_value_info(model, node.input[0])]
    outputs = [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)]
    src, dst = scratch / "matmul.onnx", scratch / "matmul.q.onnx"
    with ExternalDataWriter(scratch / "matmul.onnx.data") as mini_writer:
        tensor = mini_writer.copy_tensor(weight, base)
    mini = helper.make_model(helper.make_graph([mini_node], "matmul", inputs, outputs, [tensor]),
                             opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.save_model(mini, str(src))
    try:
        if precision == "int4":
            return _int4_quantized(str(src))
        # External data only if the int8 result (a quarter of the float32 weight) could pass
        # protobuf's limit.
        _int8_dynamic(src, dst, tensor_nbytes(weight) // 4 > LARGE_MODEL_BYTES)
        return onnx.load(str(dst))
    finally:
        for path in scratch.iterdir():
            path.unlink()


# --- the whole-model converters (everything in memory) ------------------------------------
# What `convert` wrote before it streamed; kept as the reference the streaming path is tested
# against (tests/test_export_streaming.py). Needs about 3x the model's size in memory.

def convert_in_memory(src: Path, dst: Path, precision: str, *, keep_float32_io: list) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: must be one of {PRECISIONS}")
    src, dst = Path(src), Path(dst)
    with _quiet_quantizers():
        if precision == "fp32":
            _save(onnx.load(str(src)), dst)
        elif precision == "fp16":
            to_fp16(src, dst, keep_float32_io)
        elif precision == "int8":
            to_int8(src, dst)
        else:
            to_int4(src, dst)
