"""The README's API example, run as written (with the embedded model and a real recording)."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ROOT = Path(__file__).resolve().parent.parent


def test_readme_api_example_prints_the_reply():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## The API in ten lines\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert code.count("\n") <= 10
    code = code.replace('"path/to/model-package"', "None")  # the embedded demo model
    pcm, rate = sf.read(ROOT / "examples" / "kitchen.wav", dtype="float32")
    pcm48 = soxr.resample(pcm, rate, 48000).astype(np.float32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"pcm": pcm48})
    assert "Smoke alarm! Please check the kitchen." in out.getvalue().splitlines()  # one line per reply
