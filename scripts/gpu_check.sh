#!/usr/bin/env bash
# The checks only a CUDA machine can make, as one script with its results under $OUT, so a short
# GPU session (or a new cluster node) spends its time measuring, not typing:
#   tests     pytest -m gpu (CUDA kernels of both engines, CUDA-graph replay, peak memory, TF32/bf16)
#   omniglot  the paper's Omniglot 5-way 1-shot run, full budget (60,000 iterations), timed, with
#             its 600-task test (the aim: under 10 minutes on one GPU)
#   tf32      the same run with hardware.precision=tf32: does TF32 change the test accuracy?
#   bench     mamlrun bench on the GPU for the rows docs/benchmarks.md lacks (miniImageNet 5w1s)
# Usage: OMNIGLOT=<dir with the Omniglot archives> scripts/gpu_check.sh [step ...]
# Default steps: omniglot tests (the measurement first, where device time may run out).
# Environment: PYTHON (python3), OUT (outputs/gpu-check), DEVICE (cuda; cpu only to try the
# script itself), ITERATIONS (the preset's 60,000; fewer to try the script), OVERRIDES (more
# key=value overrides for the training runs, separated by spaces).
# Each step appends "step: status, seconds" to $OUT/summary.txt; a failing step does not stop
# the ones after it, and the script exits non-zero if any failed.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu-check}
DEVICE=${DEVICE:-cuda}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(omniglot tests)
mkdir -p "$OUT"
failed=0
if [[ $DEVICE == cuda* ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check.sh: $PYTHON sees no CUDA device (DEVICE=$DEVICE); run this on a GPU machine" >&2
  exit 2
fi

omniglot_run() {  # $1: run name, then extra overrides
  local name=$1
  shift
  if [ -z "${OMNIGLOT:-}" ]; then
    echo "gpu_check.sh: set OMNIGLOT to the directory holding images_background.zip and" \
      "images_evaluation.zip" >&2
    return 2
  fi
  local hardware=cuda
  [ "$DEVICE" = cpu ] && hardware=cpu
  "$PYTHON" -m mamlrun train experiment=finn2017/omniglot_5w1s "hardware=$hardware" \
    "hardware.device=$DEVICE" "dataset.root=$OMNIGLOT" logger=none print_config=false \
    ${ITERATIONS:+train.iterations=$ITERATIONS} train.log_every=1000 train.val_every=5000 \
    train.checkpoint_every=5000 "hydra.run.dir=$OUT/$name" "$@" ${OVERRIDES:-}
}

for step in "${steps[@]}"; do
  started=$SECONDS
  case $step in
    tests)  # the case that compiles with Inductor last: compiling may take minutes
      "$PYTHON" -m pytest -q -m gpu -rA -p no:cacheprovider -k "not compiled" &&
        "$PYTHON" -m pytest -q -m gpu -rA -p no:cacheprovider -k compiled
      ;;
    omniglot) omniglot_run omniglot_5w1s ;;
    tf32) omniglot_run omniglot_5w1s_tf32 hardware.precision=tf32 ;;
    bench)
      "$PYTHON" -m mamlrun bench settings=miniimagenet_5w1s "device=$DEVICE" repeats=3 seconds=2 \
        ablation=true "output=$OUT/benchmarks.md"
      ;;
    *) echo "gpu_check.sh: unknown step '$step' (tests, omniglot, tf32, bench)" >&2 && false ;;
  esac > >(tee "$OUT/$step.log") 2>&1
  status=$?
  [ $status -eq 0 ] || failed=1
  echo "$step: $([ $status -eq 0 ] && echo ok || echo "failed ($status)"), $((SECONDS - started)) s" |
    tee -a "$OUT/summary.txt"
done
exit $failed
