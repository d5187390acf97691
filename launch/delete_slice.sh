#!/usr/bin/env bash
# Tear down a slice made by create_slice.sh (the queued resource and its TPU VM).
set -euo pipefail
PROG=delete_slice.sh
SYNOPSIS="usage: launch/delete_slice.sh --name NAME --zone ZONE [--project PROJECT] [--dry-run]"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

help() {
  cat <<EOF
$SYNOPSIS

Deletes the queued resource NAME and the TPU VM in it (gcloud compute tpus
queued-resources delete --force --quiet). The bucket (data, checkpoints, runs)
is left as it is.

  --name NAME          queued resource name (as given to create_slice.sh)
  --zone ZONE          e.g. us-central2-b
  --project PROJECT    Google Cloud project (default: gcloud's core/project)
  --dry-run            print the gcloud command instead of running it (same: DRY_RUN=1)
  -h, --help           this help
EOF
}

name="" zone="" project=""
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name | --name=*) take "$@"; name=$VAL; shift "$SHIFT" ;;
    --zone | --zone=*) take "$@"; zone=$VAL; shift "$SHIFT" ;;
    --project | --project=*) take "$@"; project=$VAL; shift "$SHIFT" ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done
[ -n "$name" ] || usage_error "--name is required"
[ -n "$zone" ] || usage_error "--zone is required"
check_name --name "$name"
check_zone --zone "$zone"

scope=(--zone="$zone")
[ -z "$project" ] || scope+=(--project="$project")
log "deleting queued resource '$name' in $zone"
run gcloud compute tpus queued-resources delete "$name" "${scope[@]}" --force --quiet
