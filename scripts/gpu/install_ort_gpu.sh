#!/usr/bin/env bash
# Source this on the GPU machine after the pieces were appended to /tmp/w/ort.whl:
# checks the wheel against .gpu-wheel/SHA256, installs it (and the carried .gpu-wheel/soxr-*.whl,
# which Session.accept_waveform needs) into /tmp/site, puts it first on PYTHONPATH, makes
# PyTorch's cu13 libraries visible, and checks the CUDA provider really runs.
set -eo pipefail
expected_sha=$(cut -d' ' -f1 .gpu-wheel/SHA256)
name=$(awk '{print $2}' .gpu-wheel/SHA256)
actual_sha=$(sha256sum /tmp/w/ort.whl | cut -d' ' -f1)
[ "$expected_sha" = "$actual_sha" ] || { echo "install_ort_gpu: wheel checksum mismatch" >&2; return 1 2>/dev/null || exit 1; }
mv /tmp/w/ort.whl "/tmp/w/$name"
python3 -m pip install -q --no-deps --target /tmp/site "/tmp/w/$name"
soxr_wheel=$(compgen -G '.gpu-wheel/soxr-*.whl' | head -n 1 || true)
if [ -n "$soxr_wheel" ]; then
  python3 -m pip install -q --no-deps --target /tmp/site "$soxr_wheel"
else
  echo "install_ort_gpu: no .gpu-wheel/soxr-*.whl carried; Session.accept_waveform will fail without soxr" >&2
fi
export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
nvidia_libs=$(python3 -c "import glob, os, torch; base = os.path.dirname(os.path.dirname(torch.__file__)); print(':'.join(sorted(glob.glob(os.path.join(base, 'nvidia', '*', 'lib')))))")
export LD_LIBRARY_PATH="${nvidia_libs}:${LD_LIBRARY_PATH:-}"
python3 - <<'PY'
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
# explicit IR version: onnx 1.23 writes IR 14 by default, newer than onnxruntime 1.31 loads
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
assert sess.get_providers()[0] == "CUDAExecutionProvider", sess.get_providers()
print("onnxruntime", ort.__version__, "runs", sess.get_providers()[0], sess.run(None, {"x": np.array([-1, 2], np.float32)})[0])
PY
