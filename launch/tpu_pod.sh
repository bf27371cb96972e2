#!/usr/bin/env bash
# Runs umm_jax on a Cloud TPU VM pod slice: one process per TPU VM worker, all started at once.
#
# Steps, each a gcloud command: create the slice when --accelerator-type is given and it does
# not exist yet (else reuse it); copy the repository's committed HEAD (git archive) to every
# worker and pip-install it there with jax[tpu] and the gcs extra (gcsfs: gs:// work dirs)
# (--worker=all); then run
# `python3 -m umm_jax.main --config=... --workdir=...` on every worker over ssh, streaming their
# output here (Ctrl-C stops streaming and the run; re-running the same command resumes it).
#
# Multi-process interface (as launch/slurm.sh): every worker runs with UMM_DISTRIBUTED=1, on
# which umm_jax.main calls jax.distributed.initialize() before it touches a device. On TPU VMs JAX takes the coordinator address, the number of processes
# and each one's id from the TPU metadata, so no other variable is needed.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE --config=FILE --workdir=gs://BUCKET/DIR
                         [options] [-- MAIN_FLAGS...]

Creates (with --accelerator-type) or reuses the TPU VM slice NAME, installs the repository's
committed HEAD on every worker, and runs umm_jax.main on all workers, streaming their logs.

Options:
  --tpu=NAME               TPU VM name (required)
  --zone=ZONE              zone, e.g. us-central2-b (required)
  --project=PROJECT        Google Cloud project (default: gcloud's configured one)
  --config=FILE            experiment config, relative to the repository root (required)
  --workdir=gs://B/DIR     work dir every worker reaches: a gs:// path (required)
  --accelerator-type=TYPE  create the slice when it does not exist, e.g. v4-32
  --version=RUNTIME        TPU software version for creation (default tpu-ubuntu2204-base)
  --spot                   create a Spot (pre-emptible) slice
  --skip-install           reuse what an earlier run installed on the workers
  --python=PY              Python on the workers (default python3)
  --dry-run                print the commands instead of running them
  -h, --help               show this help

MAIN_FLAGS go to umm_jax.main as they are, e.g. -- --config.train.epochs=1.
Uncommitted changes are not copied: commit them first.

Example:
  launch/tpu_pod.sh --tpu=umm-v4 --zone=us-central2-b --accelerator-type=v4-32 \
    --config=configs/simclr_imagenet.py --workdir=gs://my-bucket/runs/simclr_in
USAGE
}

die() {
  echo "tpu_pod.sh: $*" >&2
  echo "Run launch/tpu_pod.sh --help for usage." >&2
  exit 2
}

# Prints a word as the shell would read it back: bare when safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quotes every argument, joined by spaces: one line that the shell reads back as these words.
quote_all() {
  local word words=()
  for word in "$@"; do words+=("$(quote "$word")"); done
  echo "${words[*]}"
}

# Runs a command; with --dry-run prints it on one line instead.
run() {
  if ((dry_run)); then
    quote_all "$@"
  else
    "$@"
  fi
}

tpu="" zone="" project="" config="" workdir="" accelerator_type="" version=tpu-ubuntu2204-base
spot=0 skip_install=0 dry_run=0 python=python3
main_flags=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then
    set -- "${arg#*=}" "$@"
    arg=${arg%%=*}
  fi
  case $arg in
    --tpu) tpu=${1:?--tpu needs a value}; shift ;;
    --zone) zone=${1:?--zone needs a value}; shift ;;
    --project) project=${1:?--project needs a value}; shift ;;
    --config) config=${1:?--config needs a value}; shift ;;
    --workdir) workdir=${1:?--workdir needs a value}; shift ;;
    --accelerator-type) accelerator_type=${1:?--accelerator-type needs a value}; shift ;;
    --version) version=${1:?--version needs a value}; shift ;;
    --python) python=${1:?--python needs a value}; shift ;;
    --spot) spot=1 ;;
    --skip-install) skip_install=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) main_flags=("$@"); break ;;
    *) die "unknown option '$arg'" ;;
  esac
done
[[ -n $tpu ]] || die "--tpu is required"
[[ -n $zone ]] || die "--zone is required"
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"
[[ $workdir == gs://* ]] ||
  die "--workdir must be a gs:// path: every worker writes its part of each checkpoint there"

tpu_vm=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

if [[ -n $accelerator_type ]]; then
  if ((dry_run)); then
    echo "# only if $tpu does not exist yet:"
  fi
  if ((dry_run)) || ! "${tpu_vm[@]}" describe "$tpu" "${where[@]}" >/dev/null 2>&1; then
    create=(--accelerator-type="$accelerator_type" --version="$version")
    ((spot)) && create+=(--spot)
    run "${tpu_vm[@]}" create "$tpu" "${where[@]}" "${create[@]}"
  fi
fi

if ((!skip_install)); then
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive=${TMPDIR:-/tmp}/umm_jax_src.tar.gz
  run git -C "$repo" archive --format=tar.gz --output="$archive" HEAD
  run "${tpu_vm[@]}" scp "$archive" "$tpu:umm_jax_src.tar.gz" "${where[@]}" --worker=all
  # Relative paths: the ssh commands start in the worker's home directory.
  install="rm -rf umm_jax && mkdir umm_jax && tar -xzf umm_jax_src.tar.gz -C umm_jax"
  install+=" && $(quote_all "$python" -m pip install --quiet "./umm_jax[gcs]" "jax[tpu]")"
  run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$install"
fi

command="cd umm_jax && UMM_DISTRIBUTED=1 $(quote_all "$python" -m umm_jax.main \
  --config="$config" --workdir="$workdir" "${main_flags[@]}")"
run "${tpu_vm[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$command"
