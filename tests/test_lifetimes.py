"""Sessions end cleanly however the program ends: by `with`, close(), garbage collection, at
interpreter exit with the session still open or only finish()ed, and on SIGINT or SIGTERM.
No process may abort ("terminate called ...", exit 134) and no Runtime may be blocked."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import listenloop

KITCHEN = Path(__file__).resolve().parent.parent / "examples" / "kitchen.wav"
RUNS_PER_MODE = 13  # 4 modes: 52 processes

SCRIPT = textwrap.dedent("""
    import sys, time, soundfile as sf, listenloop
    mode = sys.argv[1]
    pcm, rate = sf.read(sys.argv[2], dtype="float32")
    rt = listenloop.Runtime()
    s = rt.session()
    if mode == "open":          # exit with the session open and audio in flight
        s.accept_waveform(pcm[: rate * 4], rate)
    elif mode == "finished":    # finish() only, never close()
        s.accept_waveform(pcm[: rate * 2], rate)
        s.finish()
    else:                        # stream in real time until a signal arrives
        print("ready", flush=True)
        for start in range(0, len(pcm), 1600):
            s.accept_waveform(pcm[start:start + 1600], rate)
            for event in s.drain():
                pass
            time.sleep(0.1)
""")


def _one(mode: str, script: Path) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, str(script), mode, str(KITCHEN)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if mode in ("sigint", "sigterm"):
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.05 * (os.getpid() % 5))
        proc.send_signal(signal.SIGINT if mode == "sigint" else signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("mode", ["open", "finished", "sigint", "sigterm"])
def test_no_process_aborts_at_exit(mode, tmp_path):
    script = tmp_path / "stream.py"
    script.write_text(SCRIPT)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _one(mode, script), range(RUNS_PER_MODE)))
    allowed = {"open": {0}, "finished": {0}, "sigint": {-signal.SIGINT}, "sigterm": {-signal.SIGTERM}}[mode]
    for code, err in results:
        assert "terminate called" not in err and "Fatal Python error" not in err, err
        assert code in allowed, (code, err[-2000:])


def test_cli_stops_cleanly_on_signals(tmp_path):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = subprocess.Popen([sys.executable, "-m", "listenloop", "run", str(KITCHEN), "--realtime"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert "terminate called" not in err and "Traceback" not in err, err
        assert proc.returncode == code, (proc.returncode, err)


def test_dropped_and_closed_sessions_never_block_the_runtime():
    rt = listenloop.Runtime()
    pcm = np.zeros(16000, np.float32)
    s = rt.session()
    s.accept_waveform(pcm)
    del s  # dropped without close: collected, and the runtime takes new sessions
    gc.collect()
    # the model thread may hold it until its current unit of work ends
    deadline = time.monotonic() + 30
    while rt.open_sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.open_sessions == 0
    with rt.session() as s2:
        s2.accept_waveform(pcm)
        s2.finish(timeout=30)
        s2.finish()  # twice is harmless
        assert [e.kind for e in s2.events()][-1] == "Finished"
    s3 = rt.session()
    s3.close()
    s3.close()
    rt.close()
    with pytest.raises(listenloop.Error, match="closed"):
        rt.session()
