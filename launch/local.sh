#!/usr/bin/env bash
# Runs umm_jax on this machine: one process over all of its local devices (GPUs, TPU, or CPU).
#
# Multi-process interface (shared by launch/slurm.sh and launch/tpu_pod.sh): a launcher that
# starts several processes sets UMM_DISTRIBUTED=1, and umm_jax.main then calls
# jax.distributed.initialize() before it touches a device (umm_jax.parallel). JAX reads
# the rest itself: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_LOCAL_DEVICE_IDS (this
# process's GPUs), and the process count and id from the cluster (SLURM_NTASKS / SLURM_PROCID
# under srun, the TPU VM metadata on a pod). This script starts a single process, so it sets
# none of them.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh --config=FILE --workdir=DIR [options] [-- MAIN_FLAGS...]

Runs `python -m umm_jax.main --config=FILE --workdir=DIR MAIN_FLAGS...` on this machine, from
the repository root. Re-running the same command resumes from the work dir's checkpoints.

Options:
  --config=FILE    experiment config, e.g. configs/simclr_cifar10.py (required)
  --workdir=DIR    work dir for checkpoints, metrics and reports (required)
  --gpus=LIST      only these GPUs, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES)
  --cpu            run on the CPU even where an accelerator is present (JAX_PLATFORMS=cpu)
  --python=PY      Python interpreter (default: $PYTHON, else python3)
  --dry-run        print the command instead of running it
  -h, --help       show this help

MAIN_FLAGS go to umm_jax.main as they are, e.g. -- --config.train.epochs=1.

Example:
  launch/local.sh --config=configs/demo.py --workdir=runs/demo --cpu
USAGE
}

die() {
  echo "local.sh: $*" >&2
  echo "Run launch/local.sh --help for usage." >&2
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

# Runs a command; with --dry-run prints it on one line instead.
run() {
  if ((dry_run)); then
    local word words=()
    for word in "$@"; do words+=("$(quote "$word")"); done
    echo "${words[*]}"
  else
    "$@"
  fi
}

config="" workdir="" gpus="" cpu=0 dry_run=0 python=${PYTHON:-python3}
main_flags=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then
    set -- "${arg#*=}" "$@"
    arg=${arg%%=*}
  fi
  case $arg in
    --config) config=${1:?--config needs a value}; shift ;;
    --workdir) workdir=${1:?--workdir needs a value}; shift ;;
    --gpus) gpus=${1:?--gpus needs a value}; shift ;;
    --python) python=${1:?--python needs a value}; shift ;;
    --cpu) cpu=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) main_flags=("$@"); break ;;
    *) die "unknown option '$arg'" ;;
  esac
done
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"

environment=()
[[ -n $gpus ]] && environment+=("CUDA_VISIBLE_DEVICES=$gpus")
((cpu)) && environment+=("JAX_PLATFORMS=cpu")
run env "${environment[@]}" "$python" -m umm_jax.main "--config=$config" "--workdir=$workdir" \
  "${main_flags[@]}"
