#!/usr/bin/env bash
# One call on a fresh, offline CUDA machine: install ttl from this checkout, run the GPU tests and every
# benchmark, and leave logs plus one results archive under OUTDIR (few files: the device tool returns 8).
#
#   scripts/gpu_suite.sh OUTDIR [--quick]      # full: about 10 minutes on an H100; --quick: about 2
#
# Optional wheels (liger-kernel, flash-attn) found in .whl/ are installed first, so the benchmarks can
# compare against them. Results land in OUTDIR/results.tgz (benchmarks/results/<gpu>/...) and are also
# copied into benchmarks/results/ of the checkout when it is writable.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_suite.sh OUTDIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
LOG="$OUT/suite.log"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "install"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { say "install failed"; exit 1; }
nvidia-smi >>"$LOG" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$LOG"

say "GPU tests"
python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests >"$OUT/gpu_tests.log" 2>&1
say "GPU tests exit $? ($(tail -1 "$OUT/gpu_tests.log"))"

RESULTS=$(mktemp -d)
bench() {  # name, time limit in seconds
  say "bench_$1"
  timeout "$2" python3 "scripts/bench_$1.py" ${QUICK:+--quick} --out "$RESULTS" >>"$OUT/benchmarks.log" 2>&1
  say "bench_$1 exit $?"
}
if [ -n "$QUICK" ]; then
  bench kernels 60; bench attention 40; bench train 60; bench generate 40
else
  bench kernels 200; bench attention 100; bench train 140; bench generate 100
fi
tar czf "$OUT/results.tgz" -C "$RESULTS" . && cp -r "$RESULTS"/. benchmarks/results/ 2>/dev/null
say "done: $(ls "$RESULTS")"
