#!/usr/bin/env bash
# Runs ON EACH TPU WORKER (launch/run.sh starts it there with
# `gcloud compute tpus tpu-vm ssh --worker=all`); not meant for your machine.
set -euo pipefail
PROG=worker.sh
SYNOPSIS="usage: launch/worker.sh [--dry-run] prepare [--pull gs://SRC=DIR ...] | run --workdir DIR [--log-worker N] [-- LAUNCH_FLAGS...] | stop"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

help() {
  cat <<EOF
$SYNOPSIS

Subcommands (all run in the checkout this script belongs to, ~/dipr1_jax on a worker):
  prepare   stop a job left over from an earlier attempt, install (python3-venv with
            apt-get first if python3 lacks it) with the README's
            command plus jax[tpu] and gcsfs for gs:// workdirs (python3 -m venv .venv &&
            . .venv/bin/activate && pip install -e '.[gcs]' 'jax[tpu]'), then copy
            every --pull gs://SRC=DIR from the bucket (gcloud storage rsync --recursive;
            DIR relative to the checkout)
  run       python -m dipr1_jax.launch LAUNCH_FLAGS... --workdir=DIR, output in
            logs/job-<time>.log (logs/latest.log links to it); the worker numbered
            --log-worker (default 0) also streams it to standard output. The pid is in
            logs/job.pid. Exit status: the trainer's, or 143 when this worker got
            SIGTERM (preemption, maintenance) whatever the trainer returned.
  stop      SIGTERM the job in logs/job.pid (the trainer checkpoints and exits), wait
            up to --grace SECONDS (default 120), then SIGKILL
options:
  --dry-run   print the commands instead of running them (same: DRY_RUN=1)
  -h, --help  this help
The worker's number comes from the TPU metadata (agent-worker-number), or from
DIPR1_WORKER_ID when set.
EOF
}

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || usage_error "a subcommand is required: prepare, run or stop"
cmd=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pidfile=logs/job.pid

activate() {  # the README's install environment
  if dry_run; then
    printf '+ . .venv/bin/activate\n' >&3
  else
    # shellcheck source=/dev/null
    . .venv/bin/activate
  fi
}

stop_job() {  # stop_job GRACE_SECONDS
  local pid waited=0
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'dipr1_jax.launch'; then
    log "stopping the job left running (pid $pid)"
    run kill -TERM "$pid"
    while ! dry_run && kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$1" ]; do
      sleep 1
      waited=$((waited + 1))
    done
    if ! dry_run && kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still running after ${1}s: SIGKILL"
      run kill -KILL "$pid"
      sleep 2
    fi
    run rm -f "${DIPR1_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
  fi
  run rm -f "$pidfile"
}

worker_id() {
  if [ -n "${DIPR1_WORKER_ID:-}" ]; then
    echo "$DIPR1_WORKER_ID"
  elif dry_run; then
    echo 0
  else
    curl -sf -H 'Metadata-Flavor: Google' \
      http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
      echo unknown
  fi
}

case $cmd in
  prepare)
    pulls=() grace=120
    while [ $# -gt 0 ]; do
      case $1 in
        --pull | --pull=*) take "$@"; pulls+=("$VAL"); shift "$SHIFT" ;;
        --grace | --grace=*) take "$@"; check_uint --grace "$VAL"; grace=$VAL; shift "$SHIFT" ;;
        *) usage_error "prepare: unknown argument '$1'" ;;
      esac
    done
    for p in ${pulls[@]+"${pulls[@]}"}; do
      [[ $p == gs://*=* ]] || usage_error "--pull '$p' is not gs://SRC=DIR"
    done
    stop_job "$grace"
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
      log "python3 cannot make a venv (Ubuntu's python3-venv is missing): installing it"
      run sudo apt-get update -q
      run sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    fi
    run python3 -m venv .venv
    activate
    run pip install -q -e '.[gcs]' 'jax[tpu]'
    for p in ${pulls[@]+"${pulls[@]}"}; do
      run mkdir -p "${p#*=}"
      run gcloud storage rsync --recursive "${p%%=*}" "${p#*=}"
    done
    ;;
  stop)
    grace=120
    while [ $# -gt 0 ]; do
      case $1 in
        --grace | --grace=*) take "$@"; check_uint --grace "$VAL"; grace=$VAL; shift "$SHIFT" ;;
        *) usage_error "stop: unknown argument '$1'" ;;
      esac
    done
    stop_job "$grace"
    ;;
  run)
    workdir="" log_worker=0 flags=()
    while [ $# -gt 0 ]; do
      case $1 in
        --workdir | --workdir=*) take "$@"; workdir=$VAL; shift "$SHIFT" ;;
        --log-worker | --log-worker=*) take "$@"; check_uint --log-worker "$VAL"; log_worker=$VAL; shift "$SHIFT" ;;
        --) shift; flags=("$@"); break ;;
        *) usage_error "run: unknown argument '$1' (launch flags go after --)" ;;
      esac
    done
    [ -n "$workdir" ] || usage_error "run: --workdir is required"
    activate
    job=(python -m dipr1_jax.launch ${flags[@]+"${flags[@]}"} --workdir="$workdir")
    if dry_run; then
      run "${job[@]}"
      exit 0
    fi
    me=$(worker_id)
    mkdir -p logs
    logfile=logs/job-$(date -u +%Y%m%dT%H%M%SZ).log
    ln -sfn "$(basename "$logfile")" logs/latest.log
    log "worker $me: $(quote "${job[@]}") > $root/$logfile"
    got_term=0
    pid=""
    # shellcheck disable=SC2329  # called by the TERM trap
    on_term() {
      got_term=1
      [ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null || true
    }
    trap on_term TERM
    "${job[@]}" >>"$logfile" 2>&1 &
    pid=$!
    echo "$pid" >"$pidfile"
    tailpid=""
    if [ "$me" = "$log_worker" ]; then
      tail -n +1 -f --pid="$pid" "$logfile" &
      tailpid=$!
    fi
    rc=0
    while :; do
      if wait "$pid"; then rc=0; else rc=$?; fi
      kill -0 "$pid" 2>/dev/null || break  # else the wait was cut short by SIGTERM
    done
    [ -z "$tailpid" ] || wait "$tailpid" || true
    rm -f "$pidfile"
    if [ "$got_term" = 1 ]; then
      log "worker $me: got SIGTERM (preemption?); trainer exited $rc; reporting 143"
      exit 143
    fi
    exit "$rc"
    ;;
  *)
    usage_error "unknown subcommand '$cmd'"
    ;;
esac
