#!/bin/bash
# Submits a dataset run to Slurm: an array of N tasks (scripts/slurm/explain.sbatch, one shard
# each), then `gradcam merge OUT` as a job that starts once every task has succeeded.
#
#   scripts/slurm/submit.sh N INPUTS OUT COMMAND [ARGS...]
#   scripts/slurm/submit.sh 4 images.txt runs/a caption --batch-size 16
#
# Prints "ARRAY_JOB_ID MERGE_JOB_ID". Logs go to OUT/slurm/. The environment:
#   GRADCAM      the gradcam binary (default: this repository's target/release/gradcam)
#   SBATCH_ARGS  more sbatch options for both jobs, e.g. "--partition=cpu --time=2:00:00"
#   ARRAY_ARGS   more sbatch options for the array's tasks only, e.g. "--cpus-per-task=4"
#   MAX_RUNNING  at most this many tasks at once (the array's %M throttle; default: no limit)
#
# `--dependency=afterok:ARRAY` on an array job waits for all its tasks, and holds the merge while
# a task is requeued; `--kill-on-invalid-dep=yes` cancels the merge when a task fails for good
# (see its log, fix, and run this again with the same OUT: the tasks resume from their records).
set -euo pipefail

if [ $# -lt 4 ]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
n=$1 inputs=$2 out=$3
shift 3
case $n in ''|*[!0-9]*|0) echo "submit.sh: N must be a positive number of tasks, not '$n'" >&2; exit 2 ;; esac

here=$(cd "$(dirname "$0")" && pwd)
gradcam=${GRADCAM:-$here/../../target/release/gradcam}
[ -x "$gradcam" ] || { echo "submit.sh: no gradcam binary at $gradcam (cargo build --release -p gradcam-cli, or set GRADCAM)" >&2; exit 2; }
gradcam=$(cd "$(dirname "$gradcam")" && pwd)/$(basename "$gradcam")

# Single-quotes a word for the merge job's /bin/sh.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

mkdir -p "$out/slurm"
throttle=${MAX_RUNNING:+%$MAX_RUNNING}
# The jobs run in this directory (sbatch's default), so relative INPUTS and OUT mean the same there.
# INPUTS, OUT and GRADCAM reach the tasks through the environment (sbatch's default --export=ALL),
# which keeps paths with commas or spaces intact.
array=$(INPUTS=$inputs OUT=$out GRADCAM=$gradcam sbatch --parsable ${SBATCH_ARGS:-} ${ARRAY_ARGS:-} \
    --array="0-$((n - 1))$throttle" --output="$out/slurm/explain-%A_%a.out" \
    "$here/explain.sbatch" "$@")
array=${array%%;*} # --parsable prints "ID" or "ID;CLUSTER"
merge=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=gradcam-merge \
    --dependency="afterok:$array" --kill-on-invalid-dep=yes --output="$out/slurm/merge-%j.out" \
    --wrap="exec $(quote "$gradcam") merge $(quote "$out")")
merge=${merge%%;*}
echo "submit.sh: array $array ($n tasks), merge $merge; logs in $out/slurm/" >&2
echo "$array $merge"
