"""Model package export (DESIGN.md "Model package"), the CLI, and parity with TorchReference."""
from __future__ import annotations

import hashlib
import os

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from listenloop.errors import ExportError  # noqa: E402
from listenloop.export import package as package_module  # noqa: E402
from listenloop.export.__main__ import main as export_main  # noqa: E402
from listenloop.export.package import export_package  # noqa: E402
from listenloop.export.parity import MIN_DECISION_AGREEMENT, parity_report, reference_run  # noqa: E402
from listenloop.package import load_package  # noqa: E402

PARITY_CHUNKS = 64


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """TorchReference's run over the parity stream, shared by every precision."""
    return reference_run(tiny_checkpoint, n_chunks=PARITY_CHUNKS, seed=0)


def test_manifest_is_complete_and_loads(tiny_package, tiny_checkpoint):
    from tokenizers import Tokenizer

    pkg = load_package(tiny_package)
    m = pkg.manifest
    assert m["format"] == "listenloop-model-package" and m["format_version"] == 2
    assert m["decoder"]["attention"] == "grouped" and pkg.attention == "grouped"
    assert m["decoder"]["precision"] == "fp32" and m["decoder"]["io_dtype"] == "float32"
    assert m["decoder"]["quantization"] is None and m["decoder"]["rope_position_rounding"] == "float16"
    assert (m["decoder"]["num_layers"], m["decoder"]["num_kv_heads"], m["decoder"]["head_dim"]) == (2, 2, 16)
    protocol = json.loads((tiny_checkpoint / "protocol_tokens.json").read_text())
    for name in ("KEEP_SILENCE", "TEXT_BEGIN", "TEXT_END", "PAD", "AUDIO_BEGIN", "ASSISTANT", "SYSTEM"):
        assert m["tokens"][name] == protocol[name]
    tokenizer = Tokenizer.from_file(str(pkg.tokenizer_path))
    t = pkg.tokens
    body = tokenizer.encode(protocol["system_prompt"], add_special_tokens=False).ids
    assert list(pkg.prefix_ids) == [t["ONLINE"], t["ENGLISH"], t["SYSTEM"], t["TEXT_BEGIN"], *body, t["TEXT_END"]]
    for name, entry in m["files"].items():
        assert (tiny_package / name).stat().st_size == entry["bytes"]
        assert entry["sha256"] == hashlib.sha256((tiny_package / name).read_bytes()).hexdigest()
    table = pkg.embeddings()
    assert table.dtype == np.float32 and list(table.shape) == m["embeddings"]["shape"]
    assert not any(p.name.startswith(".") for p in tiny_package.parent.iterdir())  # no temporary folders left


def test_fp32_parity_is_exact(tiny_checkpoint, tiny_package, reference):
    report = parity_report(tiny_checkpoint, tiny_package, reference=reference)
    print("\n" + report.table())
    assert report.passed, report.failures
    assert report.decision_agreement == 1.0 and report.reply_token_agreement == 1.0
    assert report.encoder_max_abs_diff < 1e-4 and report.logits_max_abs_diff < 1e-3
    # The stream exercises both branches of the protocol, replies included.
    assert 0 < report.reference_speak_chunks < PARITY_CHUNKS and report.compared_reply_tokens > 0


# Logit error bounds measured on the tiny checkpoint (fp16 0.004, int8 0.07, int4 0.7), with headroom:
# a quantizer regression (a wrong axis, a lost scale) shows up as errors of several logits.
LOGIT_ERROR_BOUND = {"fp16": 0.05, "int8": 0.3, "int4": 2.0}


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_lower_precision_packages_run_and_stay_close(tiny_checkpoint, tiny_package_at, reference, precision):
    path = tiny_package_at(precision)
    m = load_package(path).manifest
    assert m["decoder"]["io_dtype"] == ("float16" if precision == "fp16" else "float32")
    if precision == "int4":
        q = m["decoder"]["quantization"]
        assert (q["method"], q["bits"], q["block_size"], q["accuracy_level"]) == ("MatMulNBits", 4, 32, 4)
    report = parity_report(tiny_checkpoint, path, reference=reference)
    print("\n" + report.table())
    assert report.compared_steps == len(reference.trace.logits)
    assert report.logits_max_abs_diff < LOGIT_ERROR_BOUND[precision], report.table()
    assert report.passed == (report.decision_agreement >= MIN_DECISION_AGREEMENT)
    if precision == "fp16":
        # fp16 keeps RoPE, norms and softmax in fp32: every decision and token agrees.
        assert report.decision_agreement == 1.0 and report.reply_token_agreement == 1.0
    # int8/int4: the tiny random model's decision margins (std 0.1 logit) are below the
    # quantization noise, so its agreement figures are reported, not asserted (see the report).


def test_existing_out_dir_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_package(tiny_checkpoint, out)
    with pytest.raises(ExportError, match="not a model package"):
        export_package(tiny_checkpoint, out, force=True)  # never deletes a folder that is not a package
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_package(tiny_checkpoint, out, force=True)
    assert load_package(out).manifest["decoder"]["precision"] == "fp32"


def test_failure_mid_export_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    def disk_full(folder, manifest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(package_module, "_write_manifest", disk_full)
    with pytest.raises(ExportError, match="No space left") as info:
        export_package(tiny_checkpoint, tmp_path / "pkg")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_fails_before_any_output(tmp_path):
    from listenloop.errors import CheckpointError

    with pytest.raises(CheckpointError, match="model_config.yaml"):
        export_package(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trained_context_of_the_checkpoint_reaches_the_manifest(tiny_checkpoint, tmp_path, caplog):
    import shutil

    import yaml

    from listenloop.errors import CheckpointError
    from listenloop.model import Model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = ckpt / "model_config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["trained_context"] = 300
    config.write_text(yaml.safe_dump(cfg))
    out = export_package(ckpt, tmp_path / "pkg", max_context=512)
    assert load_package(out).manifest["decoder"]["trained_context"] == 300
    with caplog.at_level("WARNING", logger="listenloop"):
        model = Model(out)  # the package's 512 tokens are past what the model was trained on: one warning
    assert model.trained_context == 300 and "trained for" in caplog.text

    cfg["trained_context"] = cfg["block_size"] + 1
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="model_config.yaml.*trained_context"):
        export_package(ckpt, tmp_path / "pkg2")
    assert not (tmp_path / "pkg2").exists()


def test_cli_mixed_precisions_and_verify(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pkg"
    code = export_main([str(tiny_checkpoint), str(out), "--precision", "int8", "--encoder-precision", "fp32",
                        "--max-context", "1024"])
    assert code == 0
    m = load_package(out).manifest
    assert (m["encoder"]["precision"], m["decoder"]["precision"], m["decoder"]["max_context"]) == ("fp32", "int8", 1024)
    assert export_main([str(tiny_checkpoint), str(out), "--precision", "fp32"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert export_main([str(tiny_checkpoint), str(out), "--precision", "fp32", "--force", "--verify"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_an_export_removes_what_a_stopped_export_left(tiny_checkpoint, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    stale = tmp_path / f".pkg.partial-{dead}-1"
    (stale / ".work").mkdir(parents=True)
    running = tmp_path / f".pkg.partial-{os.getpid()}-2"  # an export still running: kept
    running.mkdir()
    export_package(tiny_checkpoint, tmp_path / "pkg", precision="fp32")
    assert not stale.exists() and running.exists()
