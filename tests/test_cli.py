"""The listenloop command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import soundfile as sf
from test_runtime_fixtures import runtime_package  # noqa: F401

from listenloop.cli import main


def _wav(path, seconds=2.0, rate=22050):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, np.stack([0.3 * np.sin(2 * np.pi * 300 * t)] * 2, axis=1), rate, subtype="PCM_16")
    return path


def test_run_json_lines(tmp_path, runtime_package, capsys):  # noqa: F811
    wav = _wav(tmp_path / "talk.wav")
    assert main(["run", str(wav), "--package", str(runtime_package), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    events = [json.loads(line) for line in lines]
    decisions = [e for e in events if e["event"] == "Decision"]
    assert [d["chunk"] for d in decisions] == list(range(5))
    assert all({"stream_time", "wall_time", "spoke", "p_speak"} <= d.keys() for d in decisions)
    assert events[-1]["event"] == "Stats" and events[-1]["chunks"] == 5


def test_run_transcript(tmp_path, runtime_package, capsys):  # noqa: F811
    wav = _wav(tmp_path / "talk.wav", seconds=1.2)
    assert main(["run", str(wav), "--package", str(runtime_package), "--speak-bias", "1e4"]) == 0
    out, err = capsys.readouterr()
    stamps = re.findall(r"^\[\s*(\d+\.\d)s\] ", out, flags=re.M)
    assert stamps == ["0.4", "0.8", "1.2"]  # one transcript line per reply, starting with its time
    assert "3 chunks" in err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "listenloop", *args], capture_output=True, text=True, timeout=120)


def test_bad_file_is_one_line_and_nonzero(tmp_path, runtime_package):  # noqa: F811
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    result = _cli("run", str(bad), "--package", str(runtime_package))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("listenloop: error: ")
    assert "Traceback" not in result.stderr


def test_bad_package_is_one_line(tmp_path):
    wav = _wav(tmp_path / "ok.wav", seconds=0.5)
    result = _cli("run", str(wav), "--package", str(tmp_path / "missing"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "model package folder not found" in result.stderr


def test_info(runtime_package, capsys):  # noqa: F811
    assert main(["info", "--package", str(runtime_package)]) == 0
    out = capsys.readouterr().out
    assert "runtime-test-tiny" in out and "CPUExecutionProvider" in out and "core_build" in out


def test_export_without_torch_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert main(["export", "ck", "out"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("listenloop: error:") and "pip install 'listenloop[export]'" in err


def test_devices_without_audio_hardware():
    result = _cli("devices")
    # CI has no PortAudio/devices: either a clean list or one readable error line.
    assert "Traceback" not in result.stderr
    if result.returncode:
        assert result.stderr.startswith("listenloop: error: ")
