#!/usr/bin/env bash
# One device run for the runtime: build the kernels, run tests/gpu/test_runtime_cuda.py, then
# `bench decode` (GPU figures included). Logs go to $OUT (or ./gpu-out). Usage: bash tests/gpu/run_runtime.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
# flashdesk.engine / flashdesk.offload from the source folders without installing (a bare
# machine): links inside the checkout, since the checkout's flashdesk/ shadows any PYTHONPATH entry
if ! python3 -c "import flashdesk.engine" 2>/dev/null; then
  ln -sfn ../engine flashdesk/engine; ln -sfn ../offload flashdesk/offload
fi
timeout "${TEST_S:-110}" python3 -m pytest -q -p no:cacheprovider tests/gpu/test_runtime_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout "${BENCH_S:-170}" python3 -c "
import json, sys; sys.path.insert(0, 'benchmarks'); import decode
json.dump(decode.run(False), open('$OUT/bench_decode.json', 'w'), indent=1)" 2>&1 | tee "$OUT/bench.log" | tail -30
