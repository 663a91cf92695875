"""Builds the C++ tests in csrc/tests with CMake (no Python needed) and runs them with ctest.

The sanitizer builds of the same tests (ASan+UBSan, TSan) are in .ci/sanitize.sh.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp-tests"


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler (c++, g++ or clang++) found")
def test_cpp_unit_tests_pass_under_ctest():
    configure = ["cmake", "-S", str(ROOT), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLISTENLOOP_BUILD_TESTS=ON", "-DLISTENLOOP_BUILD_PYTHON=OFF"]
    if shutil.which("ninja") and not (BUILD / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(BUILD), "--parallel", "2"],
                ["ctest", "--test-dir", str(BUILD), "--output-on-failure", "--timeout", "300"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert "100% tests passed" in result.stdout
