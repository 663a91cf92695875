"""The listenloop command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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


def _shared_terminal(monkeypatch):
    """stdout and stderr into one buffer, in the order written, as on a terminal."""
    import io

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    monkeypatch.setattr(sys, "stderr", buffer)
    return buffer


def test_notices_wait_for_the_end_of_the_reply_line(monkeypatch):
    from listenloop import events as ev
    from listenloop.cli import Printer

    out = _shared_terminal(monkeypatch)
    printer = Printer(as_json=False, verbose=True, source="talk.wav")
    for event in [ev.ReplyStarted(0.4, 0, 0, "NORMAL"), ev.TextDelta(0.4, 0, "Hel"),
                  ev.AudioDropped(0.8, 0, 6400, "listen queue full: 1 chunk(s) dropped"),
                  ev.EventsDropped(0.8, 0, 12), ev.Fault(1.2, 0, "model", "boom"),
                  ev.ContextReset(1.2, 0, 3, "quiet moment"), ev.AudioClipped(1.2, 0, 10, 3.0),
                  ev.TextDelta(0.4, 0, "lo."), ev.ReplyEnded(0.4, 0, 0, "Hello.")]:
        printer(event)
    printer.warning("talk.wav: file is truncated: read 1.0 s of the 2.0 s its header promises")
    assert out.getvalue().splitlines() == [
        "[    0.4s] 😐 Hello.",
        "[    0.8s] (dropped 6400 samples: listen queue full: 1 chunk(s) dropped)",
        "[    0.8s] (12 events dropped: the reader fell behind)",
        "[    1.2s] (model fault: boom)",
        "[    1.2s] (context reset: quiet moment)",
        "listenloop: warning: talk.wav: file is truncated: read 1.0 s of the 2.0 s its header promises",
    ]


def test_a_reply_cut_short_by_the_end_still_ends_its_line(monkeypatch):
    from listenloop import events as ev
    from listenloop.cli import Printer

    out = _shared_terminal(monkeypatch)
    printer = Printer(as_json=False)
    printer(ev.ReplyStarted(0.4, 0, 0, None))
    printer(ev.TextDelta(0.4, 0, "Hi"))
    printer(ev.Fault(0.8, 0, "speak", "gone"))
    printer.summary(ev.Stats(0.8, 0, 2, 0, 0, 0, 0, 0, 1.0, 0.1))
    assert out.getvalue().splitlines()[:2] == ["[    0.4s] Hi", "[    0.8s] (speak fault: gone)"]


def test_clipping_is_one_warning_line_for_the_run(monkeypatch):
    from listenloop import events as ev
    from listenloop.cli import Printer

    out = _shared_terminal(monkeypatch)
    printer = Printer(as_json=False, source="loud.wav")
    reason = "this looks like int16 PCM stored as float; divide by 32768"
    for i in range(30):
        printer(ev.AudioClipped(0.1 * i, 0, 1700, 32767.0 - i, reason, True))
    printer.summary(ev.Stats(3.0, 0, 8, 0, 0, 0, 0, 0, 1.0, 0.1))
    lines = out.getvalue().splitlines()
    assert lines[0] == ("listenloop: warning: loud.wav: 51,000 samples clipped (peak 32767.0): "
                        "this looks like int16 PCM stored as float; divide by 32768")
    assert len(lines) == 2 and lines[1].startswith("8 chunks")


def test_run_streams_the_file_instead_of_reading_it_whole(tmp_path, runtime_package, capsys, monkeypatch):  # noqa: F811
    import listenloop.audio

    def whole_file(*args, **kwargs):
        raise AssertionError("run must not read the whole file")

    monkeypatch.setattr(listenloop.audio, "read_audio", whole_file)
    monkeypatch.setattr(listenloop.audio, "read_audio_blocks", whole_file)
    wav = _wav(tmp_path / "talk.wav", seconds=2.0)
    assert main(["run", str(wav), "--package", str(runtime_package), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["chunk"] for e in events if e["event"] == "Decision"] == list(range(5))


def test_run_json_includes_audio_clipped(tmp_path, runtime_package, capsys):  # noqa: F811
    path = tmp_path / "loud.wav"
    t = np.arange(16000) / 16000
    sf.write(path, 3000 * np.sin(2 * np.pi * 200 * t), 16000, subtype="FLOAT")
    assert main(["run", str(path), "--package", str(runtime_package), "--json"]) == 0
    captured = capsys.readouterr()
    clipped = [e for e in map(json.loads, captured.out.splitlines()) if e["event"] == "AudioClipped"]
    assert clipped and all(e["samples"] > 0 and e["peak"] > 1 and e["int_pcm_as_float"] for e in clipped)
    assert captured.err.count("listenloop: warning:") == 1 and "divide by 32768" in captured.err


def test_verbose_run_shows_each_context_reset_once():
    kitchen = Path(__file__).resolve().parent.parent / "examples" / "kitchen.wav"
    result = _cli("-v", "run", str(kitchen))
    assert result.returncode == 0, result.stderr
    resets = [line for line in result.stderr.splitlines() if "quiet moment" in line or "context full" in line]
    assert resets and all("(context reset: " in line for line in resets), resets  # the event's line only


def test_log_lines_never_glue_to_the_status_line(monkeypatch):
    import logging

    from listenloop import events as ev
    from listenloop.cli import Printer

    buffer = _shared_terminal(monkeypatch)
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("listenloop: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        printer = Printer(as_json=False, verbose=True)
        printer.status = True  # as on a terminal
        printer.keep_logs_off_the_status_line()
        printer(ev.Decision(0.4, 0, 0, False, 0.0))
        logging.getLogger("listenloop").warning("something happened")
    finally:
        root.removeHandler(handler)
    assert "p(speak)=0.00listenloop" not in buffer.getvalue()
    assert buffer.getvalue().endswith("\rlistenloop: something happened\n")


def test_info_with_a_profile_that_does_not_exist_fails_in_one_line(capsys):
    assert main(["info", "--profile", "nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("listenloop: error: ") and "nonexistent" in err


def test_realtime_run_takes_as_long_as_the_audio(tmp_path, runtime_package, capsys):  # noqa: F811
    import time

    wav = _wav(tmp_path / "talk.wav", seconds=1.5)
    start = time.monotonic()
    assert main(["run", str(wav), "--package", str(runtime_package), "--realtime"]) == 0
    assert time.monotonic() - start >= 1.4  # never fed faster than real time (however fast the machine)
