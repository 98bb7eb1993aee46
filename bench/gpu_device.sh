#!/usr/bin/env bash
# The one command a lent GPU machine runs for the GPU suite (issue 15), through the device tool:
#
#   bench/gpu_wheels.sh                       # here, once: the wheels the GPU image lacks, into .whl/
#   device run, carry [".whl"]:  bench/gpu_device.sh [extra bench.gpu options]
#
# It installs the wheels, prints the GPU and library versions, and runs `python -m bench.gpu` with a
# deadline (DEADLINE_S, default 480 s after the suite starts) so stages that would not finish are
# skipped and reported instead of being cut off. With TRAIN_S=N it first runs `python -m bench.train`
# (LoRA training steps, issue 26) within N seconds (TRAIN_ARGS: more options); SUITE=0 skips bench.gpu. Results: $OUT/bench_gpu.{md,json,log}; append
# bench_gpu.md to BENCHMARKS.md here. With TEST_GPU_S=N it then runs the gpu-marked tests (what
# `make test-gpu` runs; carry models/tiny so they need not build it) for at most N seconds
# (interrupted, not killed, at the limit: the failures so far keep their tracebacks): $OUT/test_gpu.log;
# TESTS_FIRST=1 runs them before the benchmarks instead.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_TESTS=$(sed -n 's/^GPU_TESTS *= *//p' Makefile)
OUT=${OUT:-/tmp/deskgen-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.:client PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv
# Clocks and power every 2 s while the suite runs (is the GPU busy, or waiting for the host?).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -l 2 > "$OUT/smi.csv" 2>&1 &
echo "cpus $(nproc); $(gcc --version | head -1)"
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" || exit 1
run_gpu_tests() {
  # SIGINT at the limit: pytest then stops and still prints the tracebacks and the summary of what ran.
  timeout -s INT -k 20 "$TEST_GPU_S" python3 -m pytest -m gpu -v -rA --durations=0 -p no:cacheprovider \
    $GPU_TESTS 2>&1 | tee "$OUT/test_gpu.log"
}
# TESTS_FIRST=1: the gpu-marked tests before any benchmark (their first test is production's configuration).
if [ -n "${TEST_GPU_S:-}" ] && [ "${TESTS_FIRST:-0}" = 1 ]; then
  run_gpu_tests
fi
if [ -n "${TRAIN_S:-}" ]; then
  # LoRA training steps (issue 26) first, within TRAIN_S seconds: $OUT/bench_train.{md,json,log}.
  python3 -m bench.train --no-write --deadline-s "$TRAIN_S" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/bench_train.log"
fi
if [ "${SUITE:-1}" != 0 ]; then
  python3 -m bench.gpu --n 6 --deadline-s "${DEADLINE_S:-480}" --no-write \
    --order production,fused,compiled_fp8,compiled_fp8_deepcache,blip,vgg,compiled_fused "$@" 2>&1 | tee "$OUT/bench_gpu.log"
fi
if [ -n "${TEST_GPU_S:-}" ] && [ "${TESTS_FIRST:-0}" != 1 ]; then
  run_gpu_tests
fi
