#!/usr/bin/env bash
# Run dipr1_jax on every worker of an existing Cloud TPU pod slice.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE [--config=configs/x.py --config.grpo.beta=0.02 ...]
#
# A thin wrapper over launch/run.sh (see launch/README.md): copies this checkout
# to each worker, installs it, and starts the same command on all workers at
# once (JAX multi-host programs must start together). A --workdir=DIR among the
# launch flags becomes run.sh's --workdir (use gs://BUCKET/runs/NAME so that a
# rerun resumes); without one, every worker writes runs/tpu_pod-<UTC time>.
# The slice is not re-created after a preemption (use run.sh --accelerator-type).
set -euo pipefail
PROG=tpu_pod.sh
SYNOPSIS="usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE [launch flags...]"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help)
      sed -n '2,12s/^# \{0,1\}//p' "$0"
      echo "run.sh's options: launch/run.sh --help"
      exit 0
      ;;
    --dry-run) DRY_RUN=1; export DRY_RUN; shift ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || usage_error "TPU_NAME and ZONE are required"
tpu=$1 zone=$2
shift 2
check_name TPU_NAME "$tpu"
check_zone ZONE "$zone"
workdir="" flags=()
while [ $# -gt 0 ]; do
  case $1 in
    --workdir=*) workdir=${1#*=}; shift ;;
    --workdir)
      [ $# -ge 2 ] || usage_error "--workdir needs a value"
      workdir=$2
      shift 2
      ;;
    *) flags+=("$1"); shift ;;
  esac
done
if [ -z "$workdir" ]; then
  workdir=runs/tpu_pod-$(date -u +%Y%m%dT%H%M%SZ)
fi
exec "$(dirname "$0")/run.sh" --name "$tpu" --zone "$zone" --workdir "$workdir" \
  -- ${flags[@]+"${flags[@]}"}
