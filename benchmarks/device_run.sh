#!/usr/bin/env bash
# The prepared accelerator check (one call on a lent GPU/TPU machine):
# sampler prefill/decode throughput (fraction of the memory-bandwidth bound,
# and transformers generate on the same card), attention-backend parity (fused
# kernel vs xla), then the model's forward+backward step time and MFU with the
# xla and the fused attention backend (scan on) and without layer scan (auto).
#   OUT=/tmp/out bash benchmarks/device_run.sh
# PARTS (default "sampler attention model noscan train") picks the parts: their time
# limits add up to ~1,200 s, more than one device command may take (600 s) and more
# than a session's 15 device minutes, so run them in two calls, e.g.
#   PARTS="attention model" ...   then   PARTS="sampler train" ...
# Uses the machine's own jax/optax/torch (no install): PYTHONPATH=. only. If
# its flax is older than 0.12 and wheels were carried in .whl/, those are used.
set -u
PARTS=${PARTS:-sampler attention model noscan train}
want() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
OUT=${OUT:-/tmp/dipr1_device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import flax, sys; v = tuple(int(x) for x in flax.__version__.split('.')[:2]); sys.exit(v < (0, 12))" \
    && ls .whl/flax-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
# Sampler first: JAX takes half the card, transformers' generate runs in a child process.
if want sampler; then
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 timeout "${SAMPLER_TIMEOUT:-210}" \
  python3 benchmarks/sampler_bench.py --device 2>&1 | grep --line-buffered -v Warning | tee "$OUT/sampler_bench.txt"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
# Attention backends (issue 11 item 1): the fused kernel of this card (auto: cudnn on a CUDA
# GPU, splash on TPU) against xla, outputs and gradients, then the 3B step with each backend.
if want attention; then
timeout "${ATTN_PARITY_TIMEOUT:-120}" python3 benchmarks/attention_parity.py 2>&1 \
  | grep --line-buffered -v Warning | tee "$OUT/attention_parity.txt"
fi
FUSED=$(python3 -c "import jax; print({'gpu': 'cudnn', 'tpu': 'splash'}.get(jax.default_backend(), 'xla'))")
ATTS=xla
[ "$FUSED" != xla ] && ATTS="xla $FUSED"
want model && for ATT in $ATTS; do
  timeout "${SCAN_TIMEOUT:-150}" python3 benchmarks/model_bench.py --device --scan on --steps 5 --parts \
    --attention "$ATT" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/model_bench_scan_$ATT.txt"
done
want model && {
  echo "attention backends, 3B step (scan on, remat full), same card:"
  for ATT in $ATTS; do grep -h -E '^\[.*attention=|part:' "$OUT/model_bench_scan_$ATT.txt"; done
} | tee "$OUT/attention_summary.txt"
if want noscan; then
timeout "${NOSCAN_TIMEOUT:-150}" python3 benchmarks/model_bench.py --device --scan off --steps 5 \
  2>&1 | grep --line-buffered -v Warning | tee "$OUT/model_bench_noscan.txt"
fi
# One GRPO iteration of the 3B (ours, then TRL on the same card when trl is installed there).
if want train; then
timeout "${TRAIN_TIMEOUT:-420}" python3 benchmarks/train_bench.py --device 2>&1 \
  | grep --line-buffered -v Warning | tee "$OUT/train_bench.txt"
fi
