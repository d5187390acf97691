#!/usr/bin/env bash
# Create a Cloud TPU slice as a queued resource (Spot by default) and wait until
# it is ACTIVE. See launch/README.md.
set -euo pipefail
PROG=create_slice.sh
SYNOPSIS="usage: launch/create_slice.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- GCLOUD_FLAGS...]"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

help() {
  cat <<EOF
$SYNOPSIS

Requests a TPU slice as a queued resource (gcloud compute tpus queued-resources
create; the TPU VM gets the same name as the queued resource) and waits until
the queued resource is ACTIVE.

required:
  --name NAME               queued resource and TPU VM name (lowercase, e.g. dipr1-v4)
  --zone ZONE               e.g. us-central2-b
  --accelerator-type TYPE   e.g. v4-32, v5p-64, v5litepod-16, v6e-32
options:
  --runtime-version V       TPU VM image (default by family: v2/v3/v4 tpu-ubuntu2204-base,
                            v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project PROJECT         Google Cloud project (default: gcloud's core/project)
  --provisioning MODE       spot (default, preemptible: --spot), best-effort (preemptible,
                            gcloud alpha --best-effort), on-demand, reserved (--reserved)
  --no-wait                 return once the request is queued
  --wait-only               do not create; only wait for an existing request to be ACTIVE
  --wait-timeout SECONDS    stop waiting after this long, exit 1 (default 0: wait forever)
  --poll-seconds SECONDS    time between state checks (default 60)
  --dry-run                 print every gcloud command instead of running it (same: DRY_RUN=1)
  -h, --help                this help
  -- GCLOUD_FLAGS...        passed verbatim to queued-resources create
                            (e.g. --network=NET --service-account=SA --labels=k=v)

Exit status: 0 ACTIVE (or queued with --no-wait); 1 the request FAILED, was
SUSPENDED or timed out; 2 bad arguments.
Under --dry-run the state checks report DRY_RUN_CREATE_STATE (default ACTIVE).
EOF
}

name="" zone="" accel="" runtime="" project="" provisioning=spot
wait=1 create=1 wait_timeout=0 poll=60
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take "$@"; name=$VAL; shift "$SHIFT" ;;
    --zone | --zone=*) take "$@"; zone=$VAL; shift "$SHIFT" ;;
    --accelerator-type | --accelerator-type=*) take "$@"; accel=$VAL; shift "$SHIFT" ;;
    --runtime-version | --runtime-version=*) take "$@"; runtime=$VAL; shift "$SHIFT" ;;
    --project | --project=*) take "$@"; project=$VAL; shift "$SHIFT" ;;
    --provisioning | --provisioning=*) take "$@"; provisioning=$VAL; shift "$SHIFT" ;;
    --no-wait) wait=0; shift ;;
    --wait-only) create=0; shift ;;
    --wait-timeout | --wait-timeout=*) take "$@"; wait_timeout=$VAL; shift "$SHIFT" ;;
    --poll-seconds | --poll-seconds=*) take "$@"; poll=$VAL; shift "$SHIFT" ;;
    --) shift; extra=("$@"); break ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
export DRY_RUN

[ -n "$name" ] || usage_error "--name is required"
[ -n "$zone" ] || usage_error "--zone is required"
check_name --name "$name"
check_zone --zone "$zone"
check_uint --wait-timeout "$wait_timeout"
check_uint --poll-seconds "$poll"
[ "$poll" -gt 0 ] || usage_error "--poll-seconds must be positive"
[ "$wait" = 1 ] || [ "$create" = 1 ] || usage_error "--no-wait and --wait-only together do nothing"

scope=(--zone="$zone")
[ -z "$project" ] || scope+=(--project="$project")

if [ "$create" = 1 ]; then
  [ -n "$accel" ] || usage_error "--accelerator-type is required"
  check_accelerator --accelerator-type "$accel"
  if [ -z "$runtime" ]; then
    runtime=$(default_runtime_version "$accel") ||
      usage_error "no default runtime version for '$accel': pass --runtime-version"
  fi
  gcloud=(gcloud)
  tier=()
  case $provisioning in
    spot) tier=(--spot) ;;
    best-effort) gcloud=(gcloud alpha); tier=(--best-effort) ;;
    on-demand) ;;
    reserved) tier=(--reserved) ;;
    *) usage_error "--provisioning '$provisioning' is not one of spot, best-effort, on-demand, reserved" ;;
  esac
  log "requesting $accel slice '$name' in $zone ($provisioning, image $runtime)"
  run "${gcloud[@]}" compute tpus queued-resources create "$name" --node-id="$name" \
    "${scope[@]}" --accelerator-type="$accel" --runtime-version="$runtime" \
    ${tier[@]+"${tier[@]}"} ${extra[@]+"${extra[@]}"}
elif [ ${#extra[@]} -gt 0 ]; then
  usage_error "gcloud flags after -- need a create (drop --wait-only)"
fi

[ "$wait" = 1 ] || exit 0

start=$SECONDS
while :; do
  state=$(run gcloud compute tpus queued-resources describe "$name" "${scope[@]}" \
    --format='value(state.state)') || state=UNKNOWN
  if dry_run; then state=${DRY_RUN_CREATE_STATE:-ACTIVE}; fi
  case $state in
    ACTIVE)
      log "slice '$name' is ACTIVE"
      exit 0
      ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING)
      die 1 "queued resource '$name' is $state (see: gcloud compute tpus queued-resources describe $name --zone=$zone); delete it with launch/delete_slice.sh and try again"
      ;;
  esac
  if [ "$wait_timeout" -gt 0 ] && [ $((SECONDS - start)) -ge "$wait_timeout" ]; then
    die 1 "queued resource '$name' still ${state:-UNKNOWN} after ${wait_timeout}s"
  fi
  log "slice '$name' is ${state:-UNKNOWN}; checking again in ${poll}s"
  if dry_run; then exit 0; fi
  sleep "$poll"
done
