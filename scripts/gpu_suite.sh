#!/usr/bin/env bash
# One call on a fresh, offline CUDA machine: install ttl from this checkout, run the GPU tests and every
# benchmark, and leave logs plus one results archive under OUTDIR (few files: the device tool returns 8).
#
#   scripts/gpu_suite.sh OUTDIR [--quick]      # full: at most 9 minutes; --quick: at most 4
#
# Every step runs under its own time limit, and every benchmark rewrites its results after each shape, so a
# step cut off still leaves what it measured and the next step still runs. The limits fit the device
# tool's 10-minute call. Optional wheels (liger-kernel, flash-attn) found in .whl/ are installed first, so
# the benchmarks can compare against them. Results land in OUTDIR/results.tgz (<gpu>/<benchmark>.*) and are
# also copied into benchmarks/results/ of the checkout; OUTDIR/goals.md judges them against the speed goals
# (rewritten after every benchmark, so it holds what a cut-off call measured).
set -uo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
  "") echo "usage: scripts/gpu_suite.sh OUTDIR [--quick]" >&2; exit 2 ;;
  -*) echo "error: OUTDIR may not start with '-' (got $1)" >&2; exit 2 ;;
esac
# anything else after OUTDIR is a typo, which must not pick the short or the full suite silently
[ $# -gt 2 ] && { echo "error: at most OUTDIR and --quick (got $*)" >&2; exit 2; }
case "${2:-}" in
  ""|--quick) ;;
  *) echo "error: unknown option $2 (usage: scripts/gpu_suite.sh OUTDIR [--quick])" >&2; exit 2 ;;
esac
# without a GPU every test would skip and every benchmark refuse: stop before installing ttl into this python3
python3 -c "import torch" || { echo "error: python3 cannot import torch (above)" >&2; exit 1; }
python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || {
  echo "error: the suite needs a CUDA GPU that python3's torch can see, and there is none (each benchmark's --smoke" \
    "checks its harness on a CPU)" >&2; exit 1; }
OUT=$1
QUICK=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
LOG="$OUT/suite.log"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "install"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
  || { say "install failed"; exit 1; }
# every step imports ttl: a missing dependency (protobuf for sentencepiece's model format, say) ends the call
# here, in seconds, rather than failing each step in turn
python3 -c "import ttl_core, ttl_kernels" >>"$LOG" 2>&1 || { say "import failed: see suite.log"; exit 1; }
nvidia-smi >>"$LOG" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

# parallel test workers when pytest-xdist is there (most of the tests' time is compiling kernels), and a
# per-test limit when pytest-timeout is, so one hung test cannot take the whole step
PYTEST_ARGS=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
PYTEST_ARGS="$PYTEST_ARGS $(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 100")"
say "GPU tests"
# SIGINT at the limit: pytest then still prints its failure summary and writes the XML; a module whose
# reference library fails to import loses its own tests only; the slowest tests are listed to size the limit
timeout -s INT -k 15 "$([ -n "$QUICK" ] && echo 75 || echo 110)" python3 -m pytest -q -m gpu -p no:cacheprovider \
  $PYTEST_ARGS --continue-on-collection-errors --durations=15 -rfE --junitxml="$OUT/gpu_tests.xml" tests \
  >"$OUT/gpu_tests.log" 2>&1
say "GPU tests exit $? ($(tail -1 "$OUT/gpu_tests.log"))"

RESULTS=$(mktemp -d)
bench() {  # name, time limit in seconds, extra arguments
  local name=$1 limit=$2
  shift 2
  say "bench_$name"
  timeout "$limit" python3 "scripts/bench_$name.py" ${QUICK:+--quick} --out "$RESULTS" "$@" >>"$OUT/benchmarks.log" 2>&1
  say "bench_$name exit $?"
  # after every step: a call cut off still returns what was measured, and the goals judged so far (judged in
  # the background, overlapping the next step: importing torch takes seconds the limits do not count)
  tar czf "$OUT/results.tgz" -C "$RESULTS" .
  wait
  for folder in "$RESULTS"/*/; do
    [ -d "$folder" ] && { python3 scripts/check_goals.py "$folder" >"$OUT/goals.md.tmp" 2>>"$LOG" \
      && mv "$OUT/goals.md.tmp" "$OUT/goals.md"; } &
  done
}
if [ -n "$QUICK" ]; then
  bench kernels 45; bench attention 20; bench train 45; bench generate 30 --batches 1
else
  # RMSNorm first (four goals; its goal shapes lead its sweep), then the cross-entropy goal's shape (its quick
  # set), the rest of the kernels, and the model-level benchmarks: 405 s of limits, 530 s with the tests
  bench kernels 90 --only rms_norm; bench kernels 45 --quick --only cross_entropy
  bench kernels 50 --only rotary swiglu; bench attention 55; bench train 100 --batch 16
  bench generate 65 --hf-static-batches 1
fi
wait
cp -r "$RESULTS"/. benchmarks/results/ 2>/dev/null
say "done: $(cd "$RESULTS" && ls -R | tr '\n' ' ')"
