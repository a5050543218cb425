#!/usr/bin/env bash
# Everything GPU-side of rwkvkit in one command, for a lent GPU machine (no network there):
#
#   bash benchmarks/gpu_check.sh --wheels # HERE, before: fetches the `rwkv` reference into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh          # THERE, with .whl carried: about 6 minutes on an H100
#   bash benchmarks/gpu_check.sh --quick  # about 3 minutes: only the `cuda` backend's benchmark rows
#
# 1. makes rwkvkit importable without network or dependencies: `pip install --no-deps -e .`, else a
#    copy of pyproject's package layout on PYTHONPATH; wheels carried in .whl/ (`rwkv`, the
#    reference engine) are unpacked first, and the reference's CUDA extensions are built in the
#    background meanwhile (they build at its import; a minute or two);
# 2. builds the CUDA kernels (`rwkvkit build-kernels`);
# 3. runs every GPU test (`pytest -m gpu`: each op of the cuda backend against its torch default in
#    fp32/fp16/bf16 and int8, the architecture's patched constants reaching the kernels, whole
#    models vs the torch backend, CUDA-graph decoding, streamed layers, the torch backend on CUDA);
# 4. runs benchmarks/bench_gpu.py: the copy bandwidth, matvec's GB/s per decode matrix and team, and
#    one table (0.1B/1.5B/2.9B x cuda fp16/bf16/fp16i8: decode eager and graphed with % of the copy
#    bandwidth, prefill; the `rwkv` reference; engine rates; extras as the budget allows).
# Logs and the table as JSON go to $OUT (the device tool's folder) or /tmp/rwkvkit-gpu-check. Exit status
# is non-zero when the build or a test failed; the benchmark runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REFERENCE=rwkv==0.8.32  # pure Python (its CUDA sources build on first import), needs only tokenizers

if [ "${1:-}" = "--wheels" ]; then  # on a machine with a package index: what the GPU machine cannot fetch
  mkdir -p .whl && $PY -m pip download -q --no-deps --only-binary=:all: -d .whl "$REFERENCE" || exit 1
  exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" \
    && { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"; }
  ls -l .whl && echo "carry .whl to the GPU machine with the run (device tool: carry=[\".whl\"]), then: bash benchmarks/gpu_check.sh"
  exit 0
fi
PYP="$PY -P"  # -P: the repo root is not put first on sys.path, so `rwkvkit` resolves to the installed layout
LOG=${OUT:-/tmp/rwkvkit-gpu-check}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
start=$SECONDS
status=0
step() { echo "=== [$((SECONDS - start)) s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name())' || exit 1

if compgen -G ".whl/*.whl" > /dev/null; then
  step "unpack carried wheels (.whl/)"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/rwkvkit-wheels .whl/*.whl \
    && export PYTHONPATH=/tmp/rwkvkit-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
reference_build=
if $PY -c 'import rwkv' 2> /dev/null; then
  step "build the reference's CUDA extensions in the background (log: reference_build.log)"
  RWKV_V7_ON=1 RWKV_JIT_ON=1 RWKV_CUDA_ON=1 $PY -c 'import rwkv.model' > "$LOG/reference_build.log" 2>&1 &
  reference_build=$!
else
  echo "WARNING: no \`rwkv\` package: the reference rows stay empty (run 'bash benchmarks/gpu_check.sh --wheels' first and carry .whl)"
fi

step "make rwkvkit importable"
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$LOG/install.log" 2>&1; then
  echo "editable install failed (see install.log); using a copy of the package layout instead"
  src=/tmp/rwkvkit-src
  rm -rf $src && mkdir -p $src && cp -r rwkvkit $src/ && cp -r plugins kernels conf $src/rwkvkit/
  export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}
fi
$PYP -c 'import rwkvkit.plugins.cuda_backend, rwkvkit.kernels' || exit 1

step "build CUDA kernels"
$PYP -m rwkvkit.cli build-kernels 2>&1 | tee "$LOG/build.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "GPU tests"
timeout 270 $PYP -m pytest -q -rs -m gpu -p no:cacheprovider --junitxml="$LOG/tests.xml" \
  tests/test_cuda_backend.py tests/test_gpu.py tests/test_streaming.py 2>&1 | tee "$LOG/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -n "$reference_build" ]; then
  step "wait for the reference's CUDA extensions"
  wait "$reference_build" || echo "the reference's build failed (see reference_build.log); its rows will say why"
fi

step "GPU benchmarks"
budget=$((340 - (SECONDS - start)))  # rows that would start later are skipped (the least needed last): < 6 min in all, unless the tests ran long (then >= 120 s for the rows)
$PYP benchmarks/bench_gpu.py --budget-s $((budget > 120 ? budget : 120)) --json "$LOG/bench.json" "$@" 2>&1 | tee "$LOG/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done (exit status $status)"
exit $status
