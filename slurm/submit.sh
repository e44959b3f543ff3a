#!/bin/bash
# Submit pretraining, optionally as a --dependency=singleton chain, and chain a perplexity
# evaluation after it with --dependency=afterok. Run it from the repository root.
#
#   slurm/submit.sh [options] CONFIG.yaml [dotted.key=value ...]
#
#   --sbatch OPT      one extra sbatch option for the pretraining job(s); repeatable, e.g.
#                     --sbatch --nodes=4 --sbatch --ntasks-per-node=8 --sbatch --gpus-per-node=8
#   --job-name NAME   pretraining job name, the key of a singleton chain    [twicing-pretrain]
#   --chain N         submit N pretraining jobs with the same name and --dependency=singleton:
#                     each starts when the previous one has ended and resumes from the latest
#                     complete checkpoint (for clusters without requeue; set TWICING_REQUEUE=0
#                     so that each link stops at its time limit instead of requeueing)      [1]
#   --eval            after the (last) pretraining job succeeds, evaluate the run's latest
#                     checkpoint with slurm/eval.sbatch (--dependency=afterok; a failed
#                     pretraining job leaves the evaluation never-runnable)
#   --eval-data SPEC  data to evaluate on                                   [wikitext-2:valid]
#   --eval-out FILE   results JSON                       [<run_dir>/eval/<job name>-<SPEC>.json]
#   --eval-arg ARG    one extra argument for pretrain.evaluate; repeatable, e.g.
#                     --eval-arg --wikitext --eval-arg /data/wikitext
#   --eval-sbatch OPT one extra sbatch option for the evaluation job; repeatable
#   --dry-run         print the sbatch commands instead of running them
#
# Prints one line per submitted job: "pretrain <jobid>" (each link) and "eval <jobid>".
# The config and overrides are validated first with $TWICING_PYTHON (default python3), which
# also gives the run directory (run_dir) whose latest checkpoint is evaluated. The jobs inherit this environment (TWICING_*, PATH, ...);
# see the headers of slurm/pretrain.sbatch and slurm/eval.sbatch.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${TWICING_PYTHON:-python3}
die() { echo "submit.sh: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] || die "$1 needs a value"; }

train_opts=()
eval_opts=()
eval_args=()
job_name=twicing-pretrain
chain=1
do_eval=0
eval_data=wikitext-2:valid
eval_out=""
dry_run=0
while [ $# -gt 0 ]; do
  case $1 in
    --sbatch) need "$@"; train_opts+=("$2"); shift 2 ;;
    --job-name) need "$@"; job_name=$2; shift 2 ;;
    --chain) need "$@"; chain=$2; shift 2 ;;
    --eval) do_eval=1; shift ;;
    --eval-data) need "$@"; eval_data=$2; shift 2 ;;
    --eval-out) need "$@"; eval_out=$2; shift 2 ;;
    --eval-arg) need "$@"; eval_args+=("$2"); shift 2 ;;
    --eval-sbatch) need "$@"; eval_opts+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "usage: slurm/submit.sh [options] CONFIG.yaml [dotted.key=value ...]"
[[ $chain =~ ^[1-9][0-9]*$ ]] || die "--chain must be a positive integer, not '$chain'"
config=$1
shift

submit() {  # submit ROLE SBATCH_ARGS...: prints "ROLE <jobid>", sets $jobid
  local role=$1
  shift
  if [ "$dry_run" = 1 ]; then
    jobid="<$role>"
    printf '%q ' sbatch "$@"
    echo
    return
  fi
  jobid=$(sbatch --parsable "$@") || die "sbatch failed for the $role job"
  jobid=${jobid%%;*}  # --parsable prints "id" or "id;cluster"
  echo "$role $jobid"
}

# Validate the config (and overrides) here, before anything waits in the queue, and read the
# run directory the evaluation needs.
# shellcheck disable=SC2016  # a Python snippet, not shell
run_dir=$("$python" -c 'import sys
from pretrain.train_config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).run_dir)' "$config" "$@") \
  || die "$config ${*:-}: not a valid configuration (or TWICING_PYTHON=$python lacks the project)"

deps=()
if [ "$chain" -gt 1 ]; then deps=(--dependency=singleton); fi
for _ in $(seq "$chain"); do
  submit pretrain --job-name="$job_name" "${deps[@]}" "${train_opts[@]}" \
    "$here/pretrain.sbatch" "$config" "$@"
done

if [ "$do_eval" = 1 ]; then
  [ -n "$eval_out" ] || eval_out="$run_dir/eval/$job_name-${eval_data//[^A-Za-z0-9._-]/_}.json"
  submit eval --dependency=afterok:"$jobid" "${eval_opts[@]}" "$here/eval.sbatch" \
    --checkpoint "$run_dir/checkpoints" --data "$eval_data" --protocol segments \
    --out "$eval_out" --no-progress "${eval_args[@]}"
fi
