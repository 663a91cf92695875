"""listenloop._core.PinnedBuffer: page-locked (or aligned) host memory shared with NumPy."""
import gc

import numpy as np
import pytest

from listenloop._core import PinnedBuffer, build_info


def test_buffer_is_aligned_and_reports_its_kind():
    buf = PinnedBuffer(4096)
    assert buf.nbytes == 4096 and buf.ptr % 64 == 0
    assert buf.kind in {"cuda_host", "mlock", "aligned"}
    assert (buf.kind == "cuda_host") == build_info()["cuda_device_present"]


def test_numpy_views_share_the_memory_without_copies():
    buf = PinnedBuffer(64 * 4)
    raw = np.frombuffer(buf, dtype=np.float32)
    assert raw.ctypes.data == buf.ptr and raw.size == 64
    view = buf.as_array("float32", (4, 16))
    assert view.ctypes.data == buf.ptr
    raw[:] = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal(view, np.arange(64, dtype=np.float32).reshape(4, 16))
    view[3, 15] = -1.0
    assert raw[63] == -1.0
    mv = memoryview(buf)
    assert mv.nbytes == 256 and np.asarray(mv).ctypes.data == buf.ptr
    tail = buf.as_array("int32", (8,), offset_bytes=224)
    assert tail.ctypes.data == buf.ptr + 224
    assert tail.view(np.float32)[-1] == -1.0


def test_a_view_keeps_the_buffer_alive():
    buf = PinnedBuffer(1024)
    view = buf.as_array("float16", (512,))
    del buf
    gc.collect()
    view[:] = 2.0
    assert float(view.sum()) == 1024.0


def test_bad_views_and_sizes_are_refused():
    buf = PinnedBuffer(64)
    with pytest.raises(ValueError, match="do not fit"):
        buf.as_array("float32", (17,))
    with pytest.raises(ValueError, match="alignment"):
        buf.as_array("float32", (2,), offset_bytes=2)
    with pytest.raises(ValueError):
        PinnedBuffer(0)
