# shellcheck shell=bash
# Helpers sourced by the launch/ scripts (not run on its own).
#
# Every external command that touches the cloud or changes something goes
# through `run`: with --dry-run (or DRY_RUN=1 in the environment) it prints the
# command, shell-quoted so that it can be pasted back, as one line "+ CMD ..."
# on the script's standard output, and does not execute it. Progress messages
# go to standard error, so under --dry-run standard output holds only commands.

DRY_RUN=${DRY_RUN:-0}
PROG=${PROG:-$(basename "$0")}
# Keep the real stdout on fd 3, so that `x=$(run gcloud ...)` still shows the
# dry-run line instead of capturing it.
exec 3>&1

# quote ARGS...: one line, every argument quoted for a POSIX shell (safe
# characters are left bare; everything else goes in single quotes).
quote() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$a "
    else
      out+="'${a//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# run CMD ARGS...: execute, or under dry-run print "+ CMD ARGS..." and succeed.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$(quote "$@")" >&3
  else
    "$@"
  fi
}

dry_run() { [ "$DRY_RUN" = 1 ]; }

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }

die() {  # die STATUS MESSAGE
  local status=$1
  shift
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit "$status"
}

# usage_error MESSAGE: the error, the script's one-line synopsis, exit 2.
usage_error() {
  printf '%s: error: %s\n%s\n(run %s --help for every option)\n' \
    "$PROG" "$1" "$SYNOPSIS" "$PROG" >&2
  exit 2
}

# take "$@": the value of the option in $1, given as --opt=VALUE or --opt VALUE.
# Sets VAL and SHIFT (how many arguments to shift).
# shellcheck disable=SC2034  # VAL and SHIFT are read by the caller
take() {
  case $1 in
    --*=*)
      VAL=${1#*=}
      SHIFT=1
      ;;
    *)
      if [ $# -lt 2 ] || [[ $2 == --* ]]; then
        usage_error "$1 needs a value"
      fi
      VAL=$2
      SHIFT=2
      ;;
  esac
  if [ -z "$VAL" ]; then
    usage_error "${1%%=*} needs a non-empty value"
  fi
}

check_name() {  # check_name OPTION VALUE: a TPU / queued resource name
  [[ $2 =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "$1 '$2' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter)"
}

check_zone() {
  [[ $2 =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    usage_error "$1 '$2' is not a zone (e.g. us-central2-b)"
}

check_uint() {
  [[ $2 =~ ^[0-9]+$ ]] || usage_error "$1 '$2' is not a non-negative integer"
}

check_accelerator() {
  [[ $2 =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    usage_error "$1 '$2' is not an accelerator type (e.g. v4-32, v5p-64, v5litepod-16, v6e-32)"
}

check_gs() {  # check_gs OPTION VALUE: gs://BUCKET[/PATH]
  [[ $2 =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$ ]] ||
    usage_error "$1 '$2' is not a gs://BUCKET[/PATH] location"
}

# Default TPU VM image for an accelerator family (Cloud TPU documentation).
default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}
