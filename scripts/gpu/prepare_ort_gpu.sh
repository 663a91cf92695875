#!/usr/bin/env bash
# Run here (a machine with PyPI): fetch onnxruntime-gpu for the GPU machine's Python 3.12 and
# split it into pieces small enough for one device `run` call each (64 MiB per call, the
# working tree of about 20 MB included).
# Then, per piece, a `run` call with carry=[".gpu-wheel/<piece>"] and the command
#   mkdir -p /tmp/w && cat .gpu-wheel/<piece> >> /tmp/w/ort.whl
# and finally a call carrying .gpu-wheel/SHA256, the soxr wheel and scripts/gpu/install_ort_gpu.sh:
#   source scripts/gpu/install_ort_gpu.sh
# The soxr wheel (small, not split) is there because the GPU machine lacks soxr, which
# Session.accept_waveform needs to resample; install_ort_gpu.sh installs it next to onnxruntime.
#   scripts/gpu/prepare_ort_gpu.sh [onnxruntime-gpu version] [soxr version]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
version="${1:-1.31.1}"
soxr_version="${2:-1.1.0}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64)
grep -qx '/.gpu-wheel/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheel/' >> .git/info/exclude
rm -rf .gpu-wheel && mkdir .gpu-wheel
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .gpu-wheel "onnxruntime-gpu==${version}"
wheel=$(ls .gpu-wheel/onnxruntime_gpu-*.whl)
(cd .gpu-wheel && sha256sum "$(basename "$wheel")" > SHA256 && split -b 36M "$(basename "$wheel")" part. && rm "$(basename "$wheel")")
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .gpu-wheel "soxr==${soxr_version}"
ls -la .gpu-wheel
