"""ONNX initializers streamed to and from external-data files, one tensor at a time.

`onnx.load` / `onnx.save_model` hold every weight in memory at once (a real-size decoder is
12.4 GB of float32, twice over while protobuf serialises it). The exporter instead keeps only
the graph proto in memory: initializers at or above `SIZE_THRESHOLD` bytes live in one
`<graph>.data` file next to the graph, written and read tensor by tensor. The layout is what
`onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True, size_threshold=1024)`
writes, with every tensor's offset aligned to 4 KiB so that ONNX Runtime can map it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE_THRESHOLD = 1024  # bytes; smaller tensors stay inline (as onnx.save_model's size_threshold)
ALIGN = 4096
CHUNK_BYTES = 64 * 2**20  # elementwise conversions run over slices of this size


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def external_info(tensor: TensorProto) -> dict:
    return {entry.key: entry.value for entry in tensor.external_data}


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data, inline or external, without reading it."""
    if is_external(tensor):
        info = external_info(tensor)
        if "length" in info:
            return int(info["length"])
        return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return tensor.ByteSize()


def model_nbytes(model: onnx.ModelProto) -> int:
    """Graph proto plus external data, without loading the external data."""
    external = sum(tensor_nbytes(t) for t in model.graph.initializer if is_external(t))
    return model.ByteSize() + external


def read_array(tensor: TensorProto, base_dir: Path, data_type: int | None = None) -> np.ndarray:
    """The tensor's values; external data is read from its file (only this tensor). `data_type`:
    the type the stored bytes have, where the proto's type was changed since (fp16 conversion)."""
    if not is_external(tensor):
        if data_type is not None and data_type != tensor.data_type:
            raise ValueError(f"{tensor.name}: inline data was converted already")
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type if data_type is None else data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    offset = int(info.get("offset", 0))
    with open(Path(base_dir) / info["location"], "rb") as fh:
        fh.seek(offset)
        array = np.fromfile(fh, dtype=dtype, count=count)
    if array.size != count:
        raise ValueError(f"{info['location']}: external data of {tensor.name} is truncated")
    return array.reshape(tuple(tensor.dims))


def strip_data(tensor: TensorProto) -> None:
    """Drop a tensor's values, keeping name, type and dims (the graph no longer owns them)."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data", "external_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.DEFAULT


class ExternalDataWriter:
    """Appends tensors to one external-data file; returns the TensorProtos that refer to it.

    Tensors smaller than SIZE_THRESHOLD bytes are returned inline. `location` is relative to the
    graph's folder (the file name of the data file)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = self.path.name
        self._fh = open(self.path, "wb")
        self._offset = 0
        self.count = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self.count == 0 and self.path.exists():
            self.path.unlink()  # nothing went external: no empty file next to the graph

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _place(self, tensor: TensorProto, length: int) -> int:
        """Pad to the alignment and point `tensor` at the next `length` bytes; returns the offset."""
        pad = -self._offset % ALIGN
        if pad:
            self._fh.write(b"\0" * pad)
            self._offset += pad
        offset = self._offset
        strip_data(tensor)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += length
        self.count += 1
        return offset

    def write_array(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < SIZE_THRESHOLD:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        self._place(tensor, array.nbytes)
        self._fh.write(memoryview(array.reshape(-1)).cast("B"))
        return tensor

    def copy_tensor(self, tensor: TensorProto, base_dir: Path) -> TensorProto:
        """A copy of `tensor` whose data (inline, or external under `base_dir`) is in this file,
        copied in slices (never the whole tensor in memory)."""
        copy = TensorProto()
        copy.CopyFrom(tensor)
        if not is_external(tensor):
            self.externalize(copy)
            return copy
        info = external_info(tensor)
        length = tensor_nbytes(tensor)
        self._place(copy, length)
        with open(Path(base_dir) / info["location"], "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            left = length
            while left:
                chunk = fh.read(min(left, CHUNK_BYTES))
                if not chunk:
                    raise ValueError(f"{info['location']}: external data of {tensor.name} is truncated")
                self._fh.write(chunk)
                left -= len(chunk)
        return copy

    def write_converted(self, tensor: TensorProto, source: np.ndarray, convert) -> None:
        """Point `tensor` (type and dims already final) at `convert(source)`, applied slice by slice
        along the first axis so that no full-size temporary exists. `convert` must be elementwise."""
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if count * itemsize < SIZE_THRESHOLD:
            tensor.CopyFrom(_inline(tensor, convert(source)))
            return
        self._place(tensor, count * itemsize)
        flat = source.reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, source.itemsize))
        for start in range(0, flat.size, step):
            part = np.ascontiguousarray(convert(flat[start:start + step]))
            self._fh.write(memoryview(part).cast("B"))

    def externalize(self, tensor: TensorProto) -> None:
        """Move an in-memory tensor's data (if at or above the threshold) into the file."""
        if is_external(tensor):
            raise ValueError(f"{tensor.name}: already external")
        if tensor.HasField("raw_data") and tensor.raw_data:
            raw = tensor.raw_data
        else:
            raw = numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
        if len(raw) < SIZE_THRESHOLD:
            return
        self._place(tensor, len(raw))
        self._fh.write(raw)


def attach_initializers(path: Path, fixed_inputs: int, sources: dict) -> None:
    """Turn the parameter inputs of a graph exported with `export_params=False` into
    initializers in `<name>.data`, fetching each with `sources[name]()` (a float32 array) one
    at a time. The graph must have exactly `fixed_inputs` other inputs, before the parameters."""
    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    params = list(graph.input)[fixed_inputs:]
    unknown = [v.name for v in params if v.name not in sources]
    if unknown:
        raise RuntimeError(f"{path.name}: graph inputs without a weight behind them: {unknown[:3]}")
    with ExternalDataWriter(path.parent / (path.name + ".data")) as writer:
        for value in params:
            array = sources[value.name]()
            want = [d.dim_value for d in value.type.tensor_type.shape.dim]
            if list(array.shape) != want:
                raise RuntimeError(f"{path.name}: {value.name}: weight shape {list(array.shape)}, graph expects {want}")
            graph.initializer.append(writer.write_array(value.name, np.asarray(array, dtype=np.float32)))
            del array
    for value in params:
        graph.input.remove(value)
    onnx.save_model(model, str(path))


def _inline(template: TensorProto, values: np.ndarray) -> TensorProto:
    tensor = numpy_helper.from_array(np.asarray(values, dtype=helper.tensor_dtype_to_np_dtype(template.data_type))
                                     .reshape(tuple(template.dims)), template.name)
    return tensor


def save_graph(model: onnx.ModelProto, path: Path, large_bytes: int) -> None:
    """Write the graph proto next to its data file; a model below `large_bytes` in all is
    consolidated into one self-contained file (what the small-model packages always were)."""
    path = Path(path)
    data = path.parent / (path.name + ".data")
    if model_nbytes(model) <= large_bytes:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.save_model(model, str(path))
        if data.exists():
            data.unlink()
    else:
        onnx.save_model(model, str(path))
