"""Device profiles per graph: the Jetson profile puts only the encoder on TensorRT, with
explicit shape profiles and an engine cache, and the decoder on CUDA. Checked on CPU: what
each graph's session is asked for, and the fallback when this onnxruntime has neither."""
from __future__ import annotations

import json
import logging

import pytest

from listenloop.errors import DeviceError
from listenloop.profiles import load_profile, provider_arguments, resolve_providers


def test_jetson_runs_tensorrt_for_the_encoder_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    profile = load_profile("jetson")
    enc_names, enc_options = provider_arguments(profile, "encoder")
    dec_names, _ = provider_arguments(profile, "decoder")
    assert enc_names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert dec_names == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = enc_options[0]
    assert (trt["trt_profile_min_shapes"], trt["trt_profile_opt_shapes"], trt["trt_profile_max_shapes"]) == (
        "mel:1x128x40", "mel:1x128x40", "mel:16x128x40")
    assert trt["trt_engine_cache_enable"] == "1" and trt["trt_fp16_enable"] == "1"
    assert trt["trt_engine_cache_path"] == str(tmp_path / ".cache/listenloop/trt")
    assert (tmp_path / ".cache/listenloop/trt").is_dir()
    assert profile.primary == "CUDAExecutionProvider" and profile.kv_cache_device == "cuda"


def test_a_build_without_gpu_providers_runs_both_graphs_on_cpu(caplog):
    import onnxruntime as ort

    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime has GPU providers")
    with caplog.at_level(logging.WARNING, logger="listenloop"):
        profile = resolve_providers(load_profile("jetson"))
    assert provider_arguments(profile, "encoder")[0] == provider_arguments(profile, "decoder")[0] == [
        "CPUExecutionProvider"]
    assert profile.kv_cache_device == "cpu"
    assert any("for the encoder" in r.getMessage() for r in caplog.records)


def test_the_cpu_profile_uses_one_list_for_both_graphs():
    profile = load_profile("cpu")
    assert provider_arguments(profile, "encoder") == provider_arguments(profile, "decoder")


@pytest.mark.parametrize("graphs, field", [
    ({"vocoder": {"providers": [["CPUExecutionProvider", {}]]}}, "graphs.vocoder"),
    ({"encoder": {"providers": []}}, "graphs.encoder.providers"),
    ({"encoder": {"providers": [["TensorrtExecutionProvider", {"trt_profile_max_shapes": "16x128x40"}]]}},
     "graphs.encoder.providers[0][1].trt_profile_max_shapes"),
    ({"encoder": []}, "graphs.encoder"),
])
def test_bad_graph_settings_are_one_line(tmp_path, graphs, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "p", "providers": [["CPUExecutionProvider", {}]], "graphs": graphs}))
    with pytest.raises(DeviceError) as error:
        load_profile(str(path))
    assert str(error.value).startswith(f"{path}: {field}") and "\n" not in str(error.value)
