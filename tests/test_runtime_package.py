"""Model package validation: every broken package is one ModelPackageError naming file and field."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from test_runtime_fixtures import TOKENS, VOCAB, runtime_package  # noqa: F401

from listenloop.engine import Engine
from listenloop.errors import Error, ModelPackageError
from listenloop.package import load_package, resolve_package


@pytest.fixture()
def pkg(tmp_path, runtime_package):  # noqa: F811
    dst = tmp_path / "pkg"
    shutil.copytree(runtime_package, dst)
    return dst


def _edit_manifest(pkg, edit):
    path = pkg / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _error(pkg) -> str:
    with pytest.raises(ModelPackageError) as info:
        load_package(pkg)
    assert isinstance(info.value, Error)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{pkg}/")  # the file is named with its folder
    return message


def test_valid_package_loads(runtime_package):  # noqa: F811
    package = load_package(runtime_package)
    assert package.tokens["ASSISTANT"] == TOKENS["ASSISTANT"]
    assert package.prefix_ids[:4] == (TOKENS["ONLINE"], TOKENS["ENGLISH"], TOKENS["SYSTEM"], TOKENS["TEXT_BEGIN"])
    assert package.emotions["HAPPY"] == TOKENS["HAPPY"]
    assert package.embeddings().shape == (VOCAB, 32)


def test_missing_folder(tmp_path):
    assert "not found" in str(pytest.raises(ModelPackageError, load_package, tmp_path / "nope").value)


def test_missing_manifest(pkg):
    (pkg / "manifest.json").unlink()
    assert _error(pkg).startswith(f"{pkg / 'manifest.json'}: not found")


def test_corrupt_json(pkg):
    (pkg / "manifest.json").write_text('{"format": "listenloop-model-package", ')
    message = _error(pkg)
    assert "manifest.json" in message and "not valid JSON" in message


def test_format_1_packages_still_load_with_one_warning(pkg, caplog):
    """Version 1 had no decoder.attention; its graph has the grouped contract."""
    def downgrade(m):
        m["format_version"] = 1
        del m["decoder"]["attention"]
    _edit_manifest(pkg, downgrade)
    with caplog.at_level("WARNING", logger="listenloop"):
        package = load_package(pkg)
    assert package.attention == "grouped"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "format_version 1" in warnings[0] and "re-export" in warnings[0]
    _edit_manifest(pkg, lambda m: m["decoder"].__setitem__("attention", "grouped"))
    assert "format_version 2 field" in _error(pkg)


@pytest.mark.parametrize("section,field", [
    ("", "name"), ("decoder", "attention"), ("audio", "hop_length"), ("decoder", "num_kv_heads"), ("decoder", "quantization"),
    ("tokens", "ASSISTANT"), ("prompt", "prefix_ids"), ("sampling", "max_reply_tokens"), ("", "files"),
])
def test_missing_field(pkg, section, field):
    _edit_manifest(pkg, lambda m: (m[section] if section else m).pop(field))
    message = _error(pkg)
    assert "manifest.json" in message and (f"{section}.{field}" if section else field) in message
    assert "missing" in message


@pytest.mark.parametrize("section,field,value,expect", [
    ("decoder", "hidden_size", "32", "must be an integer"),
    ("decoder", "num_layers", True, "must be an integer"),
    ("sampling", "temperature", "hot", "must be a finite number in [0, 100]"),
    ("tokens", "PAD", 1.5, "integer token id"),
    ("tokens", "TEXT_END", VOCAB + 5, "outside the vocabulary"),
    ("decoder", "precision", "int3", "must be one of"),
    ("audio", "sample_rate", 8000, "supports only 16000"),
    ("", "format_version", 3, "re-export"),
    ("decoder", "attention", "flash", "must be one of"),
])
def test_wrong_value(pkg, section, field, value, expect):
    _edit_manifest(pkg, lambda m: (m[section] if section else m).__setitem__(field, value))
    message = _error(pkg)
    assert (f"{section}.{field}" if section else field) in message and expect in message


def test_prefix_id_outside_vocab(pkg):
    _edit_manifest(pkg, lambda m: m["prompt"]["prefix_ids"].__setitem__(3, VOCAB))
    assert "prompt.prefix_ids[3]" in _error(pkg)


def test_missing_file(pkg):
    (pkg / "tokenizer.json").unlink()
    message = _error(pkg)
    assert message.startswith(str(pkg / "tokenizer.json")) and "tokenizer.file" in message


def test_truncated_graph_file(pkg):
    data = (pkg / "decoder.onnx").read_bytes()
    (pkg / "decoder.onnx").write_bytes(data[: len(data) // 2])
    message = _error(pkg)
    assert message.startswith(str(pkg / "decoder.onnx")) and "files.decoder.onnx.bytes" in message


def test_embeddings_shape_mismatch(pkg):
    np.save(pkg / "embeddings.npy", np.zeros((VOCAB, 16), np.float32))
    message = _error(pkg)
    assert message.startswith(str(pkg / "embeddings.npy")) and "embeddings.shape" in message


def test_embeddings_not_npy(pkg):
    (pkg / "embeddings.npy").write_bytes(b"definitely not numpy")
    assert "embeddings.file" in _error(pkg)


def test_graph_disagrees_with_manifest(pkg):
    """The manifest says 3 layers; the graph has 2: caught when the engine creates sessions."""
    _edit_manifest(pkg, lambda m: m["decoder"].__setitem__("num_layers", 3))
    load_package(pkg)  # the manifest alone is consistent
    with pytest.raises(ModelPackageError) as info:
        Engine(pkg)
    assert "decoder.onnx" in str(info.value) and "past_key.2" in str(info.value)


def test_graph_static_dim_mismatch(pkg):
    model = onnx.load(str(pkg / "encoder.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    onnx.save(model, str(pkg / "encoder.onnx"))
    _edit_manifest(pkg, lambda m: m["files"]["encoder.onnx"].__setitem__("bytes", (pkg / "encoder.onnx").stat().st_size))
    with pytest.raises(ModelPackageError) as info:
        Engine(pkg)
    message = str(info.value)
    assert "encoder.onnx" in message and "'mel'" in message and "dim 1" in message


def test_corrupt_graph(pkg):
    (pkg / "encoder.onnx").write_bytes(b"\x00" * (pkg / "encoder.onnx").stat().st_size)
    with pytest.raises(ModelPackageError) as info:
        Engine(pkg)
    assert "encoder.onnx" in str(info.value)


def test_no_default_package(monkeypatch, tmp_path):
    import listenloop.package as package_module

    monkeypatch.setattr(package_module, "default_package_path", lambda: tmp_path / "none")
    with pytest.raises(ModelPackageError) as info:
        resolve_package(None)
    assert "no model package given" in str(info.value)
