#!/usr/bin/env bash
# Reproduce the README's MobileNet comparison table end to end: train every model with its
# CIFAR-10 recipe (experiment=cifar10_<model>; RECIPE=compare uses one shared recipe instead),
# over one or more seeds, then build the table and plots with `mobilebench report`.
#
# usage: scripts/reproduce_table.sh [DATA_ROOT] [extra training overrides...]
#   DATA_ROOT     an image folder with train/<class>/ and test/<class>/ (default: $MOBILEBENCH_DATA),
#                 e.g. the extracted CIFAR-10 JPEG archive
# environment (defaults in brackets):
#   RECIPE [cifar10]: cifar10 = experiment=cifar10_<model> (the README table), compare = experiment=compare
#   EPOCHS [the recipe's]  SEEDS [0]  MODELS [v1,v2,v3_small,v3_large]
#   TRAIN_SUBSET / TEST_SUBSET [all images]  VAL_SIZE [5000]
#   PARALLEL [0]  1 starts every (model, seed) run at once: for a GPU that one small model leaves idle
#   OUT [multirun/compare/<timestamp>]  REPORT [reports/compare-<timestamp>]
#   MOBILEBENCH [mobilebench]  the command to run, e.g. "python -m mobilebench"
# A run that fails does not stop the others; the report lists it with its status.
set -uo pipefail

DATA_ROOT=${1:-${MOBILEBENCH_DATA:-}}
[[ $# -gt 0 ]] && shift
if [[ -z "$DATA_ROOT" || ! -d "$DATA_ROOT/train" || ! -d "$DATA_ROOT/test" ]]; then
    echo "usage: $0 DATA_ROOT [overrides...]  (DATA_ROOT, or \$MOBILEBENCH_DATA, must hold train/ and test/; got '${DATA_ROOT}')" >&2
    exit 2
fi

STAMP=$(date +%Y-%m-%d_%H-%M-%S)
RECIPE=${RECIPE:-cifar10}
EPOCHS=${EPOCHS:-}
SEEDS=${SEEDS:-0}
MODELS=${MODELS:-v1,v2,v3_small,v3_large}
VAL_SIZE=${VAL_SIZE:-5000}
PARALLEL=${PARALLEL:-0}
OUT=${OUT:-multirun/compare/$STAMP}
REPORT=${REPORT:-reports/compare-$STAMP}
read -r -a MB <<< "${MOBILEBENCH:-mobilebench}"

case "$RECIPE" in
    cifar10|compare) ;;
    *) echo "RECIPE=$RECIPE is not a recipe; use cifar10 (per-model presets) or compare" >&2; exit 2 ;;
esac
common=(data=imagefolder "data.root=$DATA_ROOT" "data.val_size=$VAL_SIZE")
[[ -n "$EPOCHS" ]] && common+=("trainer.epochs=$EPOCHS")
[[ -n "${TRAIN_SUBSET:-}" ]] && common+=("data.train_subset=$TRAIN_SUBSET")
[[ -n "${TEST_SUBSET:-}" ]] && common+=("data.test_subset=$TEST_SUBSET")

mkdir -p "$OUT"
echo "training ${MODELS} x seeds ${SEEDS} (recipe ${RECIPE}, epochs ${EPOCHS:-as the recipe says}) into $OUT (logs: $OUT/*.log)"
pids=()
for model in ${MODELS//,/ }; do
    for seed in ${SEEDS//,/ }; do
        # One run per (model, seed) rather than one multirun: a crash in one leaves the rest running.
        experiment=compare
        [[ "$RECIPE" == cifar10 ]] && experiment="cifar10_$model"
        cmd=("${MB[@]}" train "experiment=$experiment" "${common[@]}" "model=$model" "trainer.seed=$seed" trainer.progress=log
             "hydra.run.dir=$OUT/${model}_seed${seed}" "$@")
        if [[ "$PARALLEL" == 1 ]]; then
            "${cmd[@]}" > "$OUT/${model}_seed${seed}.log" 2>&1 &
            pids+=($!)
        else
            "${cmd[@]}" 2>&1 | tee "$OUT/${model}_seed${seed}.log" || echo "run ${model} seed ${seed} failed; see its log" >&2
        fi
    done
done
for pid in "${pids[@]}"; do
    wait "$pid" || echo "a run exited with status $? (the report shows which)" >&2
done

"${MB[@]}" report "$OUT" --out "$REPORT"
