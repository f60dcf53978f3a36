#!/usr/bin/env bash
# The whole device check in one call, most valuable first, each step with its own time limit
# inside a DEADLINE (seconds from the start; set the run's timeout_s a little above it):
#   build → CUDA tests (GPU model, runtime split, Triton expert kernels) → bench gpu-kernels
#   (Triton vs torch per layer, tile sweep; records the fastest shapes for the later steps)
#   → bench kernels (the host CPU's FP4/FP8 kernels, with CPU_KERNELS=1)
#   → bench decode (two real-size layers: experts on the CPU vs on the GPU, PCIe, streamed
#   prefill) → the full-size synthetic V4-Flash (decode with and without CUDA graphs, a
#   2048-token prompt prefilled in the runtime's 1024-token chunks, torch-experts A/B, profiles
#   of decode steps and of a prefill chunk).
# Logs go to $OUT (one file per step; the run's reply keeps the tails printed here).
# Usage: DEADLINE=560 bash tests/gpu/run_session.sh   (LAYERS=N, PROMPT, STEPS, PROFILE for the
# synthetic; KV=fp8 plans it with the packed FP8 KV cache; DEPTH="128K 1M" then times decode
# with the context filled to those depths (the plan keeps their KV cache, so fewer experts fit in
# VRAM than in the runs without it); VRAM=24 plans it as for a 24 GiB card (most experts in
# host RAM: with LAYERS=21 or so, which the host's RAM can hold); PROFILE_PREFILL=0 leaves out
# the prefill profile; GPU_KERNELS=0 / DECODE=0 / SYNTHETIC=0 skip those benchmarks; TESTS="paths"
# picks the tests, TESTS= none; TESTS_LAST=1 runs them after the benchmarks, in whatever time the
# deadline leaves)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-560}
step() {  # step NAME MAX_SECONDS TAIL_LINES command...: runs within the deadline, logs to $OUT
  local name=$1 max=$2 lines=$3; shift 3
  local left=$((DEADLINE - SECONDS - 5))
  [ "$left" -lt "$max" ] && max=$left
  if [ "$max" -lt 20 ]; then echo "== $name: skipped, $left s left"; return; fi
  echo "== $name (at ${SECONDS}s, limit ${max}s)"
  timeout "$max" "$@" >"$OUT/$name.log" 2>&1
  echo "   rc=$? after ${SECONDS}s"
  tail -n "$lines" "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv,noheader
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-400; free -g | head -2; ulimit -l
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/machine.log" 2>&1; head -c 1500 "$OUT/machine.log"
python3 setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
if ! python3 -c "import flashdesk.engine" 2>/dev/null; then  # a bare machine: no install
  ln -sfn ../engine flashdesk/engine; ln -sfn ../offload flashdesk/offload
fi
read -ra TEST_PATHS <<<"${TESTS-tests/gpu tests/test_gpu_kernels.py tests/test_gpu_tuning.py}"
run_tests() { [ ${#TEST_PATHS[@]} -gt 0 ] && step tests "$1" 12 python3 -m pytest -q -p no:cacheprovider "${TEST_PATHS[@]}"; }
[ -z "$TESTS_LAST" ] && run_tests 150
[ "${GPU_KERNELS:-1}" = 1 ] && step gpu_kernels 260 40 python3 -m flashdesk bench gpu-kernels
[ -n "$CPU_KERNELS" ] && step kernels 70 12 python3 -m flashdesk bench kernels
# issue #8's two-layer figures: experts on the CPU vs all on the GPU, PCIe, streamed prefill
[ "${DECODE:-1}" = 1 ] && step decode 170 20 python3 -m flashdesk bench decode
ARGS=(--synthetic v4-flash --prompt-tokens "${PROMPT:-2048}" --decode-steps "${STEPS:-32}"
      --profile "${PROFILE:-3}")
[ "${PROFILE_PREFILL:-1}" = 1 ] && ARGS+=(--profile-prefill)
[ -n "$LAYERS" ] && ARGS+=(--layers "$LAYERS")
[ -n "$KV" ] && ARGS+=(--kv "$KV")
[ -n "$VRAM" ] && ARGS+=(--vram "$VRAM")
# shellcheck disable=SC2206  # DEPTH is a list of token counts
[ -n "$DEPTH" ] && ARGS+=(--depth $DEPTH)
[ "${SYNTHETIC:-1}" = 1 ] && step synthetic 400 14 python3 -m flashdesk bench "${ARGS[@]}"
[ -n "$TESTS_LAST" ] && run_tests 600  # whatever the deadline leaves
# what the run measured and recorded for this GPU: tuning (gpu_kernels.json) and the planner's
# calibration, to compare with the built-in defaults
python3 -c "from flashdesk.offload.bandwidth import cache_dir; print(cache_dir())" 2>/dev/null |
  { read -r d && for f in gpu_kernels calibration; do cp "$d/$f.json" "$OUT/" 2>/dev/null; done; }
echo "== done at ${SECONDS}s"
