#!/usr/bin/env bash
# Run dipr1_jax on every worker of a Cloud TPU slice, stream worker 0's log and,
# when the slice is preempted, re-create it and rerun the same command (which
# resumes from the last checkpoint in the same --workdir). See launch/README.md.
set -euo pipefail
PROG=run.sh
SYNOPSIS="usage: launch/run.sh --name NAME --zone ZONE --workdir gs://BUCKET/runs/RUN [options] [-- LAUNCH_FLAGS...]"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

help() {
  cat <<EOF
$SYNOPSIS

Each attempt: copy this checkout to every worker (~/dipr1_jax), stop a job left
over there, install (README command + jax[tpu] + gcsfs), pull the staged data, then run
  python -m dipr1_jax.launch LAUNCH_FLAGS... --workdir=WORKDIR
on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all), streaming
worker 0's output here. Every worker keeps its log in ~/dipr1_jax/logs/.
When an attempt fails, the slice's state decides: a preempted slice (queued
resource not ACTIVE, TPU VM not READY) is re-created (with --accelerator-type)
and the identical command runs again; so is a job that ended with one of
--preempt-exit-codes on a healthy slice. Any other failure stops here with the
job's status.

required:
  --name NAME               TPU VM (and queued resource) name
  --zone ZONE               e.g. us-central2-b
  --workdir DIR             run directory shared by every worker and every restart:
                            gs://BUCKET/runs/RUN (a local DIR is allowed only without
                            --accelerator-type, and does not survive a new slice)
slice (give --accelerator-type to let run.sh create the slice when it is missing
and re-create it after a preemption; without it the TPU must exist and a
preemption ends the run with status 75):
  --accelerator-type TYPE   e.g. v4-32 (passed to create_slice.sh)
  --runtime-version V       passed to create_slice.sh
  --provisioning MODE       spot (default) | best-effort | on-demand | reserved
  --project PROJECT         Google Cloud project (default: gcloud's core/project)
  --create-flag FLAG        a gcloud flag for queued-resources create, e.g.
                            --create-flag=--service-account=SA; repeatable
job:
  --pull gs://SRC=DIR       copy SRC to DIR (relative to ~/dipr1_jax) on every worker
                            before each attempt; repeatable (launch/stage.sh prints these)
  --max-restarts N          restarts after preemptions before giving up (default 10)
  --preempt-exit-codes L    job statuses that mean "preempted, rerun" even on a healthy
                            slice (default 143,255: worker.sh got SIGTERM, ssh lost the
                            connection)
  --settle-seconds S        after a failed attempt, wait S s for the slice state to show
                            a preemption before reading it (default 60)
  --grace S                 seconds a leftover job gets to checkpoint after SIGTERM (default 120)
  --log-worker N            the worker whose output is streamed here (default 0)
  --delete-when-done        delete the slice (launch/delete_slice.sh) once the job finished
  --dry-run                 print every command (tar, gcloud) instead of running it
                            (same: DRY_RUN=1)
  -h, --help                this help
  -- LAUNCH_FLAGS...        passed verbatim to python -m dipr1_jax.launch
                            (e.g. --config=configs/x.py --config.grpo.beta=0.02)

Exit status: 0 the job finished; the job's status when it failed on a healthy
slice; 75 preempted with no restarts left (rerun the same command to resume);
1 the slice could not be (re)created; 2 bad arguments.
Under --dry-run, DRY_RUN_PREEMPT_TIMES=N makes the first N attempts end as
preempted (status 255, slice SUSPENDED / PREEMPTED), DRY_RUN_JOB_EXIT the status
of the attempts after them (default 0), DRY_RUN_SLICE_STATE the state found at
the start (default ACTIVE / READY; NOT_FOUND: no slice yet).
EOF
}

name="" zone="" workdir="" accel="" runtime="" provisioning="" project=""
max_restarts=10 preempt_codes=143,255 settle=60 grace=120 log_worker=0 delete_when_done=0
pulls=() flags=() create_flags=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take "$@"; name=$VAL; shift "$SHIFT" ;;
    --zone | --zone=*) take "$@"; zone=$VAL; shift "$SHIFT" ;;
    --workdir | --workdir=*) take "$@"; workdir=$VAL; shift "$SHIFT" ;;
    --accelerator-type | --accelerator-type=*) take "$@"; accel=$VAL; shift "$SHIFT" ;;
    --runtime-version | --runtime-version=*) take "$@"; runtime=$VAL; shift "$SHIFT" ;;
    --provisioning | --provisioning=*) take "$@"; provisioning=$VAL; shift "$SHIFT" ;;
    --project | --project=*) take "$@"; project=$VAL; shift "$SHIFT" ;;
    --pull | --pull=*) take "$@"; pulls+=("$VAL"); shift "$SHIFT" ;;
    --create-flag=*) create_flags+=("${1#*=}"); shift ;;
    --create-flag)
      [ $# -ge 2 ] || usage_error "--create-flag needs a value"
      create_flags+=("$2")
      shift 2
      ;;
    --max-restarts | --max-restarts=*) take "$@"; max_restarts=$VAL; shift "$SHIFT" ;;
    --preempt-exit-codes | --preempt-exit-codes=*) take "$@"; preempt_codes=$VAL; shift "$SHIFT" ;;
    --settle-seconds | --settle-seconds=*) take "$@"; settle=$VAL; shift "$SHIFT" ;;
    --grace | --grace=*) take "$@"; grace=$VAL; shift "$SHIFT" ;;
    --log-worker | --log-worker=*) take "$@"; log_worker=$VAL; shift "$SHIFT" ;;
    --delete-when-done) delete_when_done=1; shift ;;
    --) shift; flags=("$@"); break ;;
    *) usage_error "unknown argument '$1' (launch flags go after --)" ;;
  esac
done
export DRY_RUN

[ -n "$name" ] || usage_error "--name is required"
[ -n "$zone" ] || usage_error "--zone is required"
[ -n "$workdir" ] || usage_error "--workdir is required (gs://BUCKET/runs/RUN: every restart resumes from it)"
check_name --name "$name"
check_zone --zone "$zone"
check_uint --max-restarts "$max_restarts"
check_uint --settle-seconds "$settle"
check_uint --grace "$grace"
check_uint --log-worker "$log_worker"
[[ $preempt_codes =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  usage_error "--preempt-exit-codes '$preempt_codes' is not a comma-separated list of statuses"
managed=0
if [ -n "$accel" ]; then
  managed=1
  check_accelerator --accelerator-type "$accel"
elif [ -n "$runtime" ] || [ -n "$provisioning" ] || [ ${#create_flags[@]} -gt 0 ]; then
  usage_error "--runtime-version, --provisioning and --create-flag describe a slice to create: add --accelerator-type"
fi
case $provisioning in
  "" | spot | best-effort | on-demand | reserved) ;;
  *) usage_error "--provisioning '$provisioning' is not one of spot, best-effort, on-demand, reserved" ;;
esac
if [[ $workdir == gs://* ]]; then
  check_gs --workdir "$workdir"
  workdir=${workdir%/}
elif [ "$managed" = 1 ]; then
  usage_error "--workdir must be gs://BUCKET/PATH with --accelerator-type: a re-created slice starts with empty disks"
else
  log "warning: --workdir '$workdir' is on each worker's disk: it is lost with the slice (use gs://BUCKET/runs/RUN)"
fi
for p in ${pulls[@]+"${pulls[@]}"}; do
  [[ $p =~ ^gs://[^=]+=[^=]+$ ]] || usage_error "--pull '$p' is not gs://SRC=DIR"
done
for f in ${flags[@]+"${flags[@]}"}; do
  case $f in
    --workdir | --workdir=* | -workdir | -workdir=*)
      usage_error "give the run directory as run.sh --workdir, not after --" ;;
  esac
done

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
scope=(--zone="$zone")
[ -z "$project" ] || scope+=(--project="$project")
create_args=(--name "$name" --zone "$zone" --accelerator-type "$accel")
[ -z "$runtime" ] || create_args+=(--runtime-version "$runtime")
[ -z "$provisioning" ] || create_args+=(--provisioning "$provisioning")
[ -z "$project" ] || create_args+=(--project "$project")
[ ${#create_flags[@]} = 0 ] || create_args+=(-- "${create_flags[@]}")
delete_args=(--name "$name" --zone "$zone")
[ -z "$project" ] || delete_args+=(--project "$project")
wait_args=("${delete_args[@]}")
if [ "$managed" = 1 ]; then healthy=ACTIVE; else healthy=READY; fi

# The two remote commands (run in the worker's home directory).
pull_args=()
for p in ${pulls[@]+"${pulls[@]}"}; do pull_args+=(--pull "$p"); done
prepare_cmd="mkdir -p dipr1_jax && tar -xzf dipr1_jax.tar.gz -C dipr1_jax && $(
  quote bash dipr1_jax/launch/worker.sh prepare --grace "$grace" ${pull_args[@]+"${pull_args[@]}"})"
job_cmd=$(quote bash dipr1_jax/launch/worker.sh run --workdir "$workdir" \
  --log-worker "$log_worker" -- ${flags[@]+"${flags[@]}"})

attempts=0
preempt_times=${DRY_RUN_PREEMPT_TIMES:-0}

# The slice's state: the queued resource's (managed) or the TPU VM's, NOT_FOUND
# when there is none.
slice_state() {
  local out
  if [ "$managed" = 1 ]; then
    out=$(run gcloud compute tpus queued-resources describe "$name" "${scope[@]}" \
      --format='value(state.state)' 2>/dev/null) || out=NOT_FOUND
  else
    out=$(run gcloud compute tpus tpu-vm describe "$name" "${scope[@]}" \
      --format='value(state)' 2>/dev/null) || out=NOT_FOUND
  fi
  if dry_run; then
    if [ "$attempts" = 0 ]; then
      out=${DRY_RUN_SLICE_STATE:-$healthy}
    elif [ "$attempts" -le "$preempt_times" ]; then
      if [ "$managed" = 1 ]; then out=SUSPENDED; else out=PREEMPTED; fi
    else
      out=$healthy
    fi
  fi
  echo "${out:-UNKNOWN}"
}

# (Re)create the slice, given its current state.
make_slice() {
  case $1 in
    ACTIVE) ;;
    NOT_FOUND) "$here/create_slice.sh" "${create_args[@]}" ;;
    ACCEPTED | CREATING | PROVISIONING | WAITING_FOR_RESOURCES)
      "$here/create_slice.sh" "${wait_args[@]}" --wait-only ;;
    *)
      "$here/delete_slice.sh" "${delete_args[@]}"
      "$here/create_slice.sh" "${create_args[@]}"
      ;;
  esac
}

attempt() {
  run gcloud compute tpus tpu-vm scp "$tarball" "$name":dipr1_jax.tar.gz "${scope[@]}" \
    --worker=all || return
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all \
    --command="$prepare_cmd" || return
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all \
    --command="$job_cmd" || return
  if dry_run; then
    if [ "$attempts" -le "$preempt_times" ]; then return 255; fi
    return "${DRY_RUN_JOB_EXIT:-0}"
  fi
}

state=$(slice_state)
if [ "$managed" = 1 ]; then
  [ "$state" = ACTIVE ] || log "slice '$name' is $state: making it ACTIVE first"
  make_slice "$state"
elif [ "$state" != READY ]; then
  die 1 "TPU '$name' in $zone is $state, not READY (create it with launch/create_slice.sh, or give --accelerator-type)"
fi

tarball=${TMPDIR:-/tmp}/dipr1_jax-$name.tar.gz
dry_run || trap 'rm -f "$tarball"' EXIT
run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=runs --exclude=logs \
  --exclude=staged --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
  --exclude=.hypothesis -C "$root" .

restarts=0
while :; do
  attempts=$((attempts + 1))
  log "attempt $attempts on '$name' (restarts so far: $restarts of at most $max_restarts), workdir $workdir"
  rc=0
  attempt || rc=$?
  if [ "$rc" = 0 ]; then
    log "the job finished (attempt $attempts); results in $workdir"
    if [ "$delete_when_done" = 1 ]; then
      "$here/delete_slice.sh" "${delete_args[@]}"
    fi
    exit 0
  fi
  log "attempt $attempts ended with status $rc"
  dry_run || sleep "$settle"
  state=$(slice_state)
  if [ "$state" = "$healthy" ] && [[ ",$preempt_codes," != *",$rc,"* ]]; then
    die "$rc" "the job failed with status $rc on a $state slice (not a preemption): not restarting; worker logs: ~/dipr1_jax/logs/ on each worker"
  fi
  if [ "$state" != "$healthy" ] && [ "$managed" = 0 ]; then
    die 75 "TPU '$name' is $state (preempted): re-create it (launch/create_slice.sh) and rerun this same command to resume from $workdir, or give --accelerator-type so that run.sh does it"
  fi
  if [ "$restarts" -ge "$max_restarts" ]; then
    die 75 "preempted (slice $state, status $rc) with --max-restarts $max_restarts used up; rerun this same command to resume from $workdir"
  fi
  restarts=$((restarts + 1))
  if [ "$state" != "$healthy" ]; then
    log "slice '$name' is $state (preempted): re-creating it (restart $restarts of $max_restarts)"
    make_slice "$state"
  else
    log "status $rc on an $state slice: rerunning the same command (restart $restarts of $max_restarts)"
  fi
done
