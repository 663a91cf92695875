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

from listenloop.errors import ExportError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
LARGE_MODEL_BYTES = 1_800_000_000
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations in the CPU MatMulNBits kernel
# Ops whose float16 versions lose too much (statistics over a row, exponentials).
FP16_OP_BLOCK_LIST = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "Cos", "Sin", "Range",
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


def to_fp16(src: Path, dst: Path, keep_float32_io: list) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    blocked_nodes = _rope_nodes(model)
    # ONNX shape inference cannot take an in-memory model above 2 GB; the converter then relies
    # on the value_info the exporter already wrote.
    converted = convert_float_to_float16(model, keep_io_types=keep_float32_io, op_block_list=FP16_OP_BLOCK_LIST,
                                         node_block_list=blocked_nodes, disable_shape_infer=_is_large(model))
    _save(converted, dst)


def to_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8,
                     use_external_data_format=src.stat().st_size > LARGE_MODEL_BYTES or Path(f"{src}.data").exists(),
                     extra_options={"MatMulConstBOnly": True})


def to_int4(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    model = onnx.load(str(src))
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                               accuracy_level=INT4_ACCURACY_LEVEL, bits=4)
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                           accuracy_level=INT4_ACCURACY_LEVEL, algo_config=config)
    quantizer.process()
    _save(quantizer.model.model, dst)


@contextlib.contextmanager
def _quiet_quantizers():
    """The ORT quantizers log an INFO line per node and a pre-processing hint at WARNING."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def convert(src: Path, dst: Path, precision: str, *, keep_float32_io: list) -> None:
    """Write `dst` at `precision` from the fp32 graph `src` (fp32: a plain copy of the graph)."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: must be one of {PRECISIONS}")
    src, dst = Path(src), Path(dst)
    with _quiet_quantizers():
        _convert(src, dst, precision, keep_float32_io)


def _convert(src: Path, dst: Path, precision: str, keep_float32_io: list) -> None:
    if precision == "fp32":
        _save(onnx.load(str(src)), dst)
    elif precision == "fp16":
        to_fp16(src, dst, keep_float32_io)
    elif precision == "int8":
        to_int8(src, dst)
    else:
        to_int4(src, dst)
