#!/usr/bin/env bash
# One device run for the full-size synthetic V4-Flash (issue: runtime, "Full scale on the lent GPU
# machine"): build the kernels, then `flashdesk bench --synthetic v4-flash` — the model built in
# memory with random official-format weights, planned for this machine, a PROMPT-token prefill and
# STEPS decode steps; prints decode ÷ bound and prefill ÷ PCIe bound. Figures go to $OUT.
# Usage: bash tests/gpu/run_synthetic.sh   (LAYERS=N for a cut model, BENCH_S for the time limit)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | tee "$OUT/gpu.txt"
python3 setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
if ! python3 -c "import flashdesk.engine" 2>/dev/null; then
  ln -sfn ../engine flashdesk/engine; ln -sfn ../offload flashdesk/offload
fi
# the CUDA-graph Sinkhorn (written without a GPU) first: a wrong graph would skew every figure
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_model_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -5
ARGS=(--synthetic v4-flash --prompt-tokens "${PROMPT:-2048}" --decode-steps "${STEPS:-64}")
[ -n "$LAYERS" ] && ARGS+=(--layers "$LAYERS")
timeout "${BENCH_S:-420}" python3 -m flashdesk bench "${ARGS[@]}" 2>&1 | tee "$OUT/synthetic.log" | tail -30
