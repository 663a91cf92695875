"""Model package validation: every broken package is one ModelPackageError naming file and field."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_runtime_fixtures import TOKENS, VOCAB, runtime_package  # noqa: F401

from listenloop.engine import Engine
from listenloop.errors import Error, ModelPackageError
from listenloop.package import load_package, resolve_package, verify_package


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


DEFAULT = Path(__file__).resolve().parent.parent / "runtime" / "models" / "default"


@pytest.fixture()
def default_copy(tmp_path):
    dst = tmp_path / "default"
    shutil.copytree(DEFAULT, dst)
    return dst


def test_the_shipped_manifest_has_the_sha256_of_every_file():
    checked = verify_package(DEFAULT)
    assert sorted(name for name, _, _ in checked) == sorted(p.name for p in DEFAULT.iterdir() if p.name != "manifest.json")
    assert all(status == "ok" for _, _, status in checked)


def test_a_file_with_the_right_size_and_wrong_content_is_refused_at_load(default_copy):
    data = bytearray((default_copy / "tokenizer.json").read_bytes())
    data[-2:-1] = b" " if data[-2:-1] != b" " else b"\n"
    (default_copy / "tokenizer.json").write_bytes(bytes(data))
    message = _error(default_copy)
    assert message.startswith(str(default_copy / "tokenizer.json")) and "files.tokenizer.json.sha256" in message


def test_big_files_are_hashed_by_verify_only(default_copy, monkeypatch, capsys):
    from listenloop import package as package_module
    from listenloop.cli import main

    data = bytearray((default_copy / "encoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (default_copy / "encoder.onnx").write_bytes(bytes(data))
    monkeypatch.setattr(package_module, "HASH_AT_LOAD_BYTES", 1 << 20)  # the 2 MB encoder counts as big
    load_package(default_copy)  # sizes agree: loads
    with pytest.raises(ModelPackageError, match=r"encoder\.onnx: files\.encoder\.onnx\.sha256: manifest says"):
        verify_package(default_copy)
    assert main(["verify", str(default_copy)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "files.encoder.onnx.sha256" in err


def test_a_malformed_checksum_is_one_line(default_copy):
    _edit_manifest(default_copy, lambda m: m["files"]["decoder.onnx"].update(sha256="abc"))
    assert "files.decoder.onnx.sha256: must be 64 lower-case hex digits, got 'abc'" in _error(default_copy)


def test_a_model_file_linking_out_of_the_folder_is_refused(pkg, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(pkg / "tokenizer.json", outside)
    (pkg / "tokenizer.json").symlink_to(outside)
    message = _error(pkg)
    assert "tokenizer.file: links to" in message and "outside the package folder" in message


def test_nan_embeddings_fail_the_start_up_self_test(pkg):
    table = np.load(pkg / "embeddings.npy")
    np.save(pkg / "embeddings.npy", np.full_like(table, np.nan))
    with pytest.raises(ModelPackageError) as info:
        Engine(pkg)
    message = str(info.value)
    assert "\n" not in message and "self-test gave NaN or infinite decoder outputs" in message
