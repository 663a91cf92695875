"""bench/gpu_check.py and scripts/gpu/check.sh on a CPU: the tiny model through the same code
the GPU run takes, each cell on the provider it falls back to."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the check exports its packages

ROOT = Path(__file__).resolve().parents[1]
CHECK_SH = ROOT / "scripts" / "gpu" / "check.sh"
CPU = "CPUExecutionProvider"
TINY = ["--dims", "tiny", "--profiles", "cpu", "--precisions", "fp32,int4", "--quick", "--stream-counts", "1,2,4",
        "--stream-precisions", "fp32"]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def run_check_sh(args, tmp: Path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp / "check.json"), WORK=str(tmp / "work"))
    return subprocess.run(["bash", str(CHECK_SH), *args], capture_output=True, text=True, env=env, timeout=400)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run through check.sh --allow-cpu: (process, report)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = run_check_sh(["--allow-cpu", *TINY], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((tmp / "check.json").read_text())


def test_tiny_run_records_every_figure_of_every_cell(tiny_run):
    _, report = tiny_run
    module = load_gpu_check()
    if not has_cuda_provider():
        assert report["gpu"] is False
    assert report["complete"] is False  # CPU cells never complete a GPU check
    assert report["error"] is None and report["dims"] == "tiny"
    assert "bench/gpu_check.py" in report["command"] and "--quick" in report["command"]
    env = report["environment"]
    for key in ("onnxruntime", "providers_available", "cpu", "cuda_probe", "gpu", "physical_cores"):
        assert key in env
    phases = report["phases"]
    assert phases["checkpoint"]["seconds"] > 0 and phases["checkpoint"]["error"] is None
    assert set(phases["export"]) == {"fp32", "int4"}
    assert all(p["seconds"] > 0 and p["error"] is None and not p["reused"] for p in phases["export"].values())

    assert {(c["precision"], c["profile"]) for c in report["cells"]} == {("fp32", "cpu"), ("int4", "cpu")}
    for cell in report["cells"]:
        where = f"{cell['precision']}/{cell['profile']}"
        assert cell["status"] == "ok" and cell["error"] is None, where
        ran = cell["ran"]
        assert ran["providers"][0] == CPU and ran["encoder_providers"][0] == CPU, where
        assert ran["cuda_graphs"] is False and ran["cuda_graphs_requested"] is False
        assert ran["kv_cache_device"] == "cpu"
        assert set(cell["figures"]) == set(module.FIGURES)
        for name, value in cell["figures"].items():
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (where, name, value)
        assert cell["skipped"] == {}, where
        assert set(cell["seconds"]) == {"load", "warm_up", "listening", "reply", "context", "session"}
        assert cell["details"]["reply"]["tokens_per_s"]["n"] >= 3
        assert cell["details"]["environment"]["precision"] == cell["precision"]


def test_tiny_run_measures_the_pytorch_eager_peer_on_the_same_decoder(tiny_run):
    _, report = tiny_run
    peer = report["peer"]
    assert peer["status"] == "ok" and peer["error"] is None, peer
    assert peer["ran"]["attention"] == "sdpa" and peer["ran"]["transformers"]
    if not has_cuda_provider():
        assert peer["ran"] == dict(peer["ran"], device="cpu", dtype="float32")
    f = peer["figures"]
    assert f["listening_step_ms"]["n"] >= 3 and f["reply_token_ms"]["n"] >= 3
    assert 0 < f["listening_step_ms"]["median"] and math.isfinite(f["decode_tokens_per_s"]) and f["decode_tokens_per_s"] > 0


def test_tiny_run_reports_streams_real_time_through_the_slot_decoder(tiny_run):
    _, report = tiny_run
    fp32, int4 = report["streams"]["fp32"], report["streams"].get("int4")
    assert fp32["status"] == "ok" and fp32["error"] is None, fp32
    assert fp32["ran"]["slot_decoder"] is True and fp32["ran"]["providers"][0] == CPU
    measured = [row["streams"] for row in fp32["counts"]]
    assert measured and measured == sorted(measured) and set(measured) | set(map(int, fp32["skipped"])) == {1, 2, 4}
    for row in fp32["counts"]:
        p99 = row["ttfr_ms"]["p99"]
        assert row["ttfr_ms"]["n"] == row["rounds"] >= 3 and math.isfinite(p99) and p99 > 0
        assert row["real_time"] == (row["ttfr_ms"]["p99"] <= 60 and row["round_ms"]["max"] <= 400)
    kept = [row["streams"] for row in fp32["counts"] if row["real_time"]]
    assert fp32["streams_real_time"] == (max(kept) if kept else 0)
    assert int4 is None  # --stream-precisions names fp32 only: int4 gets no slot decoder and no streams run
    assert json.loads((Path(report["phases"]["export"]["fp32"]["path"]) / "manifest.json").read_text())["slot_decoder"]


def test_check_sh_allow_cpu_passes_through_and_prints_the_summary(tiny_run, tmp_path):
    proc, report = tiny_run
    assert "GPU check: gpu=false complete=false" in proc.stdout or has_cuda_provider()
    assert "not GPU figures" in proc.stdout or has_cuda_provider()
    assert "JSON: " in proc.stdout and "precision profile" in proc.stdout
    assert "streams fp32 / cpu" in proc.stdout and "streams_real_time=" in proc.stdout
    # --summary prints the same table from the file
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    table = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--summary", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "fp32" in table.stdout and "int4" in table.stdout


def test_check_sh_without_cuda_exits_2_with_one_line(tmp_path):
    if has_cuda_provider():
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    proc = run_check_sh(["--dims", "tiny"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDAExecutionProvider" in lines[0] and "--allow-cpu" in lines[0], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "check.json").exists()


def test_complete_only_when_every_cell_ran_on_cuda_as_its_profile_asked(tmp_path):
    module = load_gpu_check()
    args = module.parse_args(["--out", str(tmp_path / "c.json"), "--work", str(tmp_path), "--dims", "tiny"])
    check = module.Check(args, "test")
    for cell in check.report["cells"]:
        graphs = cell["profile"] == "cuda-graphs"
        cell["status"] = "ok"
        cell["ran"].update(providers=[module.CUDA, CPU], encoder_providers=[module.CUDA, CPU], cuda_graphs=graphs,
                           cuda_graphs_requested=graphs)
    check.save()
    assert len(check.report["cells"]) == 4 and check.report["complete"] is True
    check.report["cells"][1]["ran"]["cuda_graphs"] = False  # graphs asked for, dropped
    check.save()
    assert check.report["complete"] is False
    assert json.loads((tmp_path / "c.json").read_text())["complete"] is False
    assert module._fit(40, 0.01, 0.1, 3) == 10 and module._fit(40, 1.0, 0.1, 3) == 3 and module._fit(4, 0.0, 1, 3) == 4


def test_cuda_probe_model_loads_in_onnxruntime_1_31():
    """onnx 1.23 writes IR 14 unless told; onnxruntime 1.31 reads at most IR 13, and a probe that
    cannot load makes a real GPU run report "gpu": false."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = load_gpu_check().probe_model()
    assert model.ir_version == 10 and [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    np.testing.assert_array_equal(session.run(None, {"x": np.array([-1, 2], np.float32)})[0], [0, 2])
