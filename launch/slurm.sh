#!/usr/bin/env bash
# Runs umm_jax as a multi-node GPU job under SLURM: one process per GPU (default) or per node.
#
# Outside an allocation the script submits itself with sbatch; inside one (SLURM_JOB_ID is set:
# the sbatch job, or salloc) it starts the processes with srun. Every process runs
# `python -m umm_jax.main --config=... --workdir=...` with this environment, the interface
# umm_jax.main reads (umm_jax.parallel.initialize_distributed):
#   UMM_DISTRIBUTED=1        several processes: call jax.distributed.initialize() first.
#   JAX_COORDINATOR_ADDRESS  host:port of process 0: the job's first node; the port is --port,
#                            by default JAX's own choice for SLURM (61440 + job id mod 4096).
#                            JAX reads it itself.
#   JAX_LOCAL_DEVICE_IDS     --per=node only: all GPUs of the node (0,...,G-1); JAX reads it.
#                            With --per=gpu JAX takes SLURM_LOCALID, the task's rank on its node.
#   SLURM_NTASKS, SLURM_PROCID  the number of processes and this one's id, set by srun and read
#                            by JAX's SLURM detection.
# main.py's --coordinator_address / --num_processes / --process_id override these.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm.sh --config=FILE --workdir=DIR [options] [-- MAIN_FLAGS...]

Outside an allocation: submits this script with sbatch (nodes, tasks and GPUs from the options
below; partition, time limit, account, ... from sbatch's own SBATCH_* environment variables,
e.g. SBATCH_PARTITION, SBATCH_TIMELIMIT, SBATCH_ACCOUNT). The job's output goes to
slurm-<job name>-<job id>.out in the current directory.
Inside an allocation (sbatch, salloc): starts the processes with srun, each running
`python -m umm_jax.main --config=FILE --workdir=DIR MAIN_FLAGS...` from the current directory
(the repository root). The work dir must be on a file system every node sees.

Options:
  --config=FILE        experiment config, e.g. configs/simclr_imagenet.py (required)
  --workdir=DIR        shared work dir for checkpoints, metrics and reports (required)
  --nodes=N            nodes (default: the allocation's SLURM_JOB_NUM_NODES, else 1)
  --gpus-per-node=G    GPUs per node (default 8)
  --per=gpu|node       one process per GPU (default) or one per node driving all its GPUs
  --port=PORT          coordinator port on the first node (default 61440 + job id mod 4096)
  --job-name=NAME      sbatch job name (default umm_jax)
  --python=PY          Python interpreter (default: $PYTHON, else python3)
  --dry-run            print the sbatch or srun command instead of running it
  -h, --help           show this help

MAIN_FLAGS go to umm_jax.main as they are, e.g. -- --config.train.epochs=1.

Example:
  SBATCH_PARTITION=gpu SBATCH_TIMELIMIT=24:00:00 launch/slurm.sh --nodes=4 --gpus-per-node=8 \
    --config=configs/simclr_imagenet.py --workdir=/shared/runs/simclr_in
USAGE
}

die() {
  echo "slurm.sh: $*" >&2
  echo "Run launch/slurm.sh --help for usage." >&2
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

# The first host of a SLURM node list such as 'gpu[003-006,010],big01'.
first_host() {
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1" | head -n 1
  else
    local head=${1%%,*}
    if [[ $1 =~ ^([^,\[]+)\[([^],-]+) ]]; then
      head=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
    fi
    echo "$head"
  fi
}

config="" workdir="" nodes=${SLURM_JOB_NUM_NODES:-1} gpus_per_node=8 per=gpu port=""
job_name=umm_jax dry_run=0 python=${PYTHON:-python3}
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
    --nodes) nodes=${1:?--nodes needs a value}; shift ;;
    --gpus-per-node) gpus_per_node=${1:?--gpus-per-node needs a value}; shift ;;
    --per) per=${1:?--per needs a value}; shift ;;
    --port) port=${1:?--port needs a value}; shift ;;
    --job-name) job_name=${1:?--job-name needs a value}; shift ;;
    --python) python=${1:?--python needs a value}; shift ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) main_flags=("$@"); break ;;
    *) die "unknown option '$arg'" ;;
  esac
done
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] ||
  die "--gpus-per-node must be a positive integer, got '$gpus_per_node'"
[[ -z $port || $port =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number, got '$port'"
case $per in
  gpu) tasks_per_node=$gpus_per_node ;;
  node) tasks_per_node=1 ;;
  *) die "--per must be 'gpu' or 'node', got '$per'" ;;
esac

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  # Not in an allocation: submit this script, which runs the branch below inside the job.
  resubmit=(--nodes="$nodes" --gpus-per-node="$gpus_per_node" --per="$per" --python="$python")
  [[ -n $port ]] && resubmit+=(--port="$port")
  run sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node" \
    --gpus-per-node="$gpus_per_node" --output="slurm-%x-%j.out" \
    "$0" "${resubmit[@]}" --config="$config" --workdir="$workdir" -- "${main_flags[@]}"
  exit 0
fi

coordinator=$(first_host "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")
port=${port:-$((61440 + SLURM_JOB_ID % 4096))}
environment=(UMM_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=$coordinator:$port")
if [[ $per == node ]]; then
  environment+=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus_per_node - 1)))")
fi
run srun --nodes="$nodes" --ntasks="$((nodes * tasks_per_node))" \
  --ntasks-per-node="$tasks_per_node" --kill-on-bad-exit=1 --label \
  env "${environment[@]}" "$python" -m umm_jax.main --config="$config" --workdir="$workdir" \
  "${main_flags[@]}"
