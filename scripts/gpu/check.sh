#!/usr/bin/env bash
# The GPU check in one command, on a machine with an NVIDIA GPU and onnxruntime-gpu installed
# (scripts/gpu/prepare_ort_gpu.sh, then `source scripts/gpu/install_ort_gpu.sh`):
#   scripts/gpu/check.sh [--allow-cpu] [bench/gpu_check.py options...]
# Writes ONE JSON ($OUT: a file, or a folder to hold gpu_check.json; default gpu_check.json in the
# repository root) with TTFR p50, the listening step and 1-token decode speed of real-dimension
# random weights at fp16 and int4, with and without CUDA graphs, and streams_real_time: the most
# streams (of 1, 8, 32, 64, 128, 256) whose steps share the slot decoder with p99 TTFR <= 60 ms
# (fp16; bench/gpu_check.py says what each figure is), and prints a summary table.
# Checkpoint and packages go to $WORK (default /tmp/listenloop-gpu-check) and are reused.
# Exit status: 2 when onnxruntime has no CUDAExecutionProvider (--allow-cpu runs anyway, on the
# CPU fallback), 3 when listenloop cannot be imported, else that of bench/gpu_check.py (124: the
# 480 s limit was reached; the JSON then holds what was measured).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python="${PYTHON:-python3}"
out="${OUT:-gpu_check.json}"
if [ -d "$out" ]; then out="$out/gpu_check.json"; fi  # OUT may name a folder
work="${WORK:-/tmp/listenloop-gpu-check}"

allow_cpu=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--allow-cpu" ]; then allow_cpu=1; else args+=("$arg"); fi
done

providers=$("$python" -c 'import onnxruntime as ort; print(ort.__version__, ",".join(ort.get_available_providers()))') \
  || { echo "check.sh: $python cannot import onnxruntime" >&2; exit 2; }
case ",${providers#* }," in
  *,CUDAExecutionProvider,*) ;;
  *)
    if [ "$allow_cpu" = 0 ]; then
      echo "check.sh: onnxruntime ${providers%% *} has no CUDAExecutionProvider (has ${providers#* });" \
           "install onnxruntime-gpu (scripts/gpu/prepare_ort_gpu.sh, install_ort_gpu.sh) or pass --allow-cpu" >&2
      exit 2
    fi
    echo "check.sh: no CUDAExecutionProvider; running on the CPU fallback (--allow-cpu)" >&2 ;;
esac
if ! "$python" -c 'import listenloop._core' 2>/dev/null; then
  echo "check.sh: $python cannot import listenloop with its C++ core; install this repository first" >&2
  exit 3
fi

status=0
PYTHONUNBUFFERED=1 timeout -k 15 480 "$python" bench/gpu_check.py --out "$out" --work "$work" ${args[@]+"${args[@]}"} \
  || status=$?
if [ "$status" != 0 ] && [ -f "$out" ]; then  # stopped early: the table of what the JSON holds
  "$python" bench/gpu_check.py --summary "$out" || true
fi
echo "JSON: $(realpath "$out" 2>/dev/null || echo "$out")"
exit "$status"
