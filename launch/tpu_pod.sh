#!/usr/bin/env bash
# Run dipr1_jax on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--config=configs/x.py --config.grpo.beta=0.02 ...]
#
# Copies this checkout to each worker, installs it, and starts the same
# command on all workers at once (JAX multi-host programs must start together;
# jax.distributed picks up the pod topology from the TPU metadata).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [launch flags...]" >&2
  exit 2
fi
tpu=$1; zone=$2; shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all "$root" "$tpu":~/dipr1_jax
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/dipr1_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]' && python -m dipr1_jax.launch $*"
