#!/usr/bin/env bash
# The one-GPU recipe check (experiment=cifar10_v2_gpu: v2 on CIFAR-10, data on the GPU, compile),
# prepared to run as ONE call of the device tool, whose machine has torch but no Hydra and no
# network, and whose time is short (15 minutes a session, 10 a command).
#
#   here, once:  scripts/gpu_recipe.sh prepare
#                  -> .gpu/ (git-ignored): wheels of hydra-core, omegaconf and antlr4 (pure Python),
#                     and the JPEG CIFAR-10 tarball from ../shared/data
#   there:       device run  command="bash scripts/gpu_recipe.sh run"  carry=[".gpu"]  timeout_s=590
#                  -> $OUT: summary.json, metrics.jsonl, train.log, gpu.txt
#
# EPOCHS (default: the preset's) and BUDGET_S (default 540: seconds from the script's start to the
# end of everything, so the files come back inside a 590 s command) override the defaults; extra
# arguments after `run` are passed to `mobilebench train` as overrides. If training runs out of
# time it is stopped (its last.pt saved) and that checkpoint is scored, so a figure always comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true

prepare() {
  local here shared=../shared/data/cifar10-jpeg.tar.gz
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels
  # The versions this checkout's environment runs, so the GPU run uses what the tests passed with.
  here=$(python3 -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))' 2>/dev/null) \
    || { echo "gpu_recipe: hydra-core not found; run prepare inside mobilebench's environment (. .venv/bin/activate)" >&2; exit 1; }
  # antlr4 4.9.3 ships as an sdist only; `pip wheel` builds it (pure Python, any platform).
  python3 -m pip wheel --no-deps --quiet -w .gpu/wheels $here
  [[ -f $shared ]] || { echo "gpu_recipe: $shared not found; the JPEG CIFAR-10 tarball is needed" >&2; exit 1; }
  install -m 644 "$shared" .gpu/cifar10-jpeg.tar.gz
  du -sh .gpu
}

run() {
  [[ -d .gpu/wheels && -f .gpu/cifar10-jpeg.tar.gz ]] || { echo "gpu_recipe: run 'scripts/gpu_recipe.sh prepare' here first and carry .gpu" >&2; exit 1; }
  local out=${OUT:-/tmp/gpu_out} data=/tmp/gpu_data/cifar10-jpeg rundir=/tmp/gpu_run
  local deadline=$((SECONDS + ${BUDGET_S:-540})) status=0
  rm -rf "$rundir" && mkdir -p "$out" "$data"
  # Whatever happens next, the run's files go back.
  trap "cp '$rundir/summary.json' '$rundir/metrics.jsonl' '$out/' 2>/dev/null || true" EXIT  # expanded now: the locals are gone at exit
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  tar -xzf .gpu/cifar10-jpeg.tar.gz -C "$data"
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' || true; } > "$out/gpu.txt" 2>&1
  # Training gets what is left minus 60 s for the scoring below; SIGTERM first, so it saves last.pt.
  timeout -k 20 $((deadline - SECONDS - 60)) python3 -m mobilebench train experiment=cifar10_v2_gpu data=imagefolder \
    "data.root=$data" trainer.progress=log ${EPOCHS:+trainer.epochs=$EPOCHS} "$@" "hydra.run.dir=$rundir" \
    > "$out/train.log" 2>&1 || status=$?
  if [[ $status -ne 0 && -f $rundir/checkpoints/last.pt ]]; then
    echo "gpu_recipe: training stopped early (exit $status); scoring its last checkpoint" | tee -a "$out/train.log"
    timeout -k 5 $((deadline - SECONDS)) python3 -m mobilebench eval "checkpoint=$rundir/checkpoints/last.pt" \
      trainer.tta=flip "hydra.run.dir=$rundir/eval_last" >> "$out/train.log" 2>&1 || true
    cp "$rundir/eval_last/eval.json" "$out/eval_last.json" 2>/dev/null || true
  fi
  tail -n 15 "$out/train.log"
  echo "gpu_recipe: training exit status $status"
  # 124 would read as the device tool's own time-out.
  [[ $status -eq 0 ]] || return 1
}

case $mode in
  prepare) prepare ;;
  run) run "$@" ;;
  *) echo "usage: scripts/gpu_recipe.sh prepare|run [overrides...]" >&2; exit 2 ;;
esac
