#!/usr/bin/env bash
# The prepared accelerator check (one call on a lent GPU/TPU machine):
# model forward+backward step time and MFU, then sampler prefill/decode
# throughput and the fraction of the memory-bandwidth bound.
#   OUT=/tmp/out bash benchmarks/device_run.sh
# Uses the machine's own jax/flax/optax (no install): PYTHONPATH=. only.
set -u
OUT=${OUT:-/tmp/dipr1_device}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
timeout "${MODEL_TIMEOUT:-270}" python3 benchmarks/model_bench.py --device --scan off --steps 5 \
  2>&1 | grep -v Warning | tee "$OUT/model_bench.txt"
timeout "${SAMPLER_TIMEOUT:-200}" python3 benchmarks/sampler_bench.py --device \
  2>&1 | grep -v Warning | tee "$OUT/sampler_bench.txt"
