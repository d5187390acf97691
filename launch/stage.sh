#!/usr/bin/env bash
# Stage a dataset and/or a Hugging Face checkpoint on a bucket for a pod run.
set -euo pipefail
PROG=stage.sh
SYNOPSIS="usage: launch/stage.sh --bucket gs://BUCKET [--data DIR] [--checkpoint DIR] [options]"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"

help() {
  cat <<EOF
$SYNOPSIS

Copies local directories to the bucket with gcloud storage rsync --recursive
(re-running it uploads only what changed):
  --data DIR        -> gs://BUCKET/data/NAME         (NAME: --data-name, default basename DIR)
  --checkpoint DIR  -> gs://BUCKET/checkpoints/NAME  (NAME: --checkpoint-name, default basename DIR)
and prints the launch/run.sh flags that pull them onto every worker.

  --bucket gs://BUCKET      destination bucket (required)
  --data DIR                dataset directory in its official layout (see dipr1_jax/train/data.py)
  --data-name NAME          name under gs://BUCKET/data/
  --checkpoint DIR          Hugging Face Qwen2.5-VL directory (config.json, *.safetensors, tokenizer)
  --checkpoint-name NAME    name under gs://BUCKET/checkpoints/
  --create-bucket           create the bucket first (gcloud storage buckets create)
  --location REGION         the bucket's location with --create-bucket (use the slice's
                            region, e.g. us-central2)
  --project PROJECT         Google Cloud project (default: gcloud's core/project)
  --dry-run                 print every gcloud command instead of running it (same: DRY_RUN=1)
  -h, --help                this help
At least one of --data and --checkpoint is required.
EOF
}

bucket="" data="" data_name="" ckpt="" ckpt_name="" project="" create_bucket=0 location=""
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) help; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --bucket | --bucket=*) take "$@"; bucket=$VAL; shift "$SHIFT" ;;
    --data | --data=*) take "$@"; data=$VAL; shift "$SHIFT" ;;
    --data-name | --data-name=*) take "$@"; data_name=$VAL; shift "$SHIFT" ;;
    --checkpoint | --checkpoint=*) take "$@"; ckpt=$VAL; shift "$SHIFT" ;;
    --checkpoint-name | --checkpoint-name=*) take "$@"; ckpt_name=$VAL; shift "$SHIFT" ;;
    --create-bucket) create_bucket=1; shift ;;
    --location | --location=*) take "$@"; location=$VAL; shift "$SHIFT" ;;
    --project | --project=*) take "$@"; project=$VAL; shift "$SHIFT" ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
done

[ -n "$bucket" ] || usage_error "--bucket is required"
bucket=${bucket%/}
[[ $bucket =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9]$ ]] ||
  usage_error "--bucket '$bucket' is not gs://BUCKET (a bucket, without a path)"
[ -n "$data" ] || [ -n "$ckpt" ] || usage_error "give --data DIR and/or --checkpoint DIR"
[ -z "$data" ] || [ -d "$data" ] || usage_error "--data '$data' is not a directory"
[ -z "$ckpt" ] || [ -d "$ckpt" ] || usage_error "--checkpoint '$ckpt' is not a directory"
[ -z "$data_name" ] || [ -n "$data" ] || usage_error "--data-name needs --data"
[ -z "$ckpt_name" ] || [ -n "$ckpt" ] || usage_error "--checkpoint-name needs --checkpoint"
[ "$create_bucket" = 1 ] || [ -z "$location" ] || usage_error "--location needs --create-bucket"
check_object_name() {
  [[ $2 =~ ^[A-Za-z0-9][-_.A-Za-z0-9]*$ ]] ||
    usage_error "$1 '$2' is not a plain name (letters, digits, '-', '_', '.'); pass $1"
}
data=${data%/} ckpt=${ckpt%/}
if [ -n "$data" ]; then
  [ -n "$data_name" ] || data_name=$(basename "$data")
  check_object_name --data-name "$data_name"
fi
if [ -n "$ckpt" ]; then
  [ -n "$ckpt_name" ] || ckpt_name=$(basename "$ckpt")
  check_object_name --checkpoint-name "$ckpt_name"
fi
[ "$create_bucket" = 0 ] || [ -n "$location" ] || usage_error "--create-bucket needs --location REGION"

gflags=()
[ -z "$project" ] || gflags+=(--project="$project")

if [ "$create_bucket" = 1 ]; then
  run gcloud storage buckets create "$bucket" --location="$location" \
    --uniform-bucket-level-access ${gflags[@]+"${gflags[@]}"}
fi

pulls=() flags=()
if [ -n "$data" ]; then
  dest=$bucket/data/$data_name
  log "staging dataset $data -> $dest"
  run gcloud storage rsync --recursive "$data" "$dest" ${gflags[@]+"${gflags[@]}"}
  pulls+=(--pull "$dest=staged/data/$data_name")
  flags+=(--config.data.root="staged/data/$data_name")
fi
if [ -n "$ckpt" ]; then
  dest=$bucket/checkpoints/$ckpt_name
  log "staging checkpoint $ckpt -> $dest"
  run gcloud storage rsync --recursive "$ckpt" "$dest" ${gflags[@]+"${gflags[@]}"}
  pulls+=(--pull "$dest=staged/checkpoints/$ckpt_name")
  flags+=(--config.model.checkpoint="staged/checkpoints/$ckpt_name")
fi
log "staged. Give launch/run.sh: $(quote "${pulls[@]}") --workdir $bucket/runs/RUN_NAME ... -- $(quote "${flags[@]}") ..."
