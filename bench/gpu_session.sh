#!/usr/bin/env bash
# One device session for issue 19 (one H200, at most 10 minutes of command time): install the carried wheels, run
# the GPU benchmark within a time budget, then the cuda-marked tests; everything lands in $OUT as at most 8 files.
#
# Here first:  python bench/gpu_prepare.py      (fills the git-ignored .gpu/: wheels for Python 3.12, fidelity images)
# Device call: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=600)
# Then:        paste $OUT/gpu/gpu_measured.txt into mugshotrace.train.archs (GPU_MEASURED, GPU_COMPILE_S) and record
#              results.md in bench/README.md and bench/phase2_plan.md.
set -u
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT/gpu"
BUDGET=${BUDGET:-400}         # seconds for the benchmark; the rest of the 600 s goes to set-up, the tests and packing
T0=$(date +%s)
WHEELS=${WHEELS:-.gpu/whl}   # WHEELS=none: use the installed packages (a CPU rehearsal here)
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi || true; python3 -c "import torch, fastai, timm, mugshotrace; print('torch', torch.__version__, 'fastai', fastai.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"; } > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
echo "set-up: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/setup.log"
FID=""; [ -d .gpu/fidelity ] && FID="--fidelity-data .gpu/fidelity"
timeout $((BUDGET + 90)) python3 bench/bench_gpu.py --out "$OUT/gpu" --budget-s "$BUDGET" $FID > "$OUT/bench.log" 2>&1
echo "bench exit $? after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/bench.log"
LEFT=$(( 560 - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 30 ]; then
  timeout "$LEFT" python3 -m pytest -q -s --runcuda -m cuda -p no:cacheprovider tests/test_gpu_recipe.py tests/test_confounding.py > "$OUT/cuda_tests.log" 2>&1
  echo "cuda tests exit $? after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/cuda_tests.log"
else
  echo "cuda tests skipped: ${LEFT} s left" > "$OUT/cuda_tests.log"
fi
# at most 8 files come back, two folders down: the tables travel as one archive, the summaries as plain files
tar -czf "$OUT/gpu_tables.tar.gz" -C "$OUT" gpu
cp "$OUT/gpu/results.md" "$OUT/results.md" 2>/dev/null; cp "$OUT/gpu/gpu_measured.txt" "$OUT/gpu_measured.txt" 2>/dev/null
rm -rf "$OUT/gpu"
tail -c 3000 "$OUT/bench.log"; tail -5 "$OUT/cuda_tests.log"
echo "total: $(( $(date +%s) - T0 )) s"
