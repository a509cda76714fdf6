#!/usr/bin/env bash
# One command for a lent GPU: all GPU tests, then every kernel benchmark, then a summary table,
# then the optimizer step-time benchmark.
# Writes under ${OUT:-benchmarks/results/latest}: env.txt, tests.log, bench.json, summary.md,
# optim_step_time.md (+ .log), optim_step_time_muon.md (+ .log), overhead.md (+ .log).
# Budget: the whole script must finish well inside 8 minutes on one H100/H200 (the timeouts below
# add up to 9 min 40 s, under the device tool's 10-minute limit, if every stage runs to its limit;
# the optimizer step's 60 s came out of the GPU tests' and the kernel benchmarks' limits, the
# overhead benchmark's 40 s out of the build's and the kernel benchmarks', Muon's step 30 s out of
# the build's (15 s) and the GPU tests' (15 s)).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/latest}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$py" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$py" -c "import cupy; print('cupy', cupy.__version__)" 2>&1
  "$py" -m kfac_kernels env 2>&1
} > "$out/env.txt"
cat "$out/env.txt"

# Build the optional CUDA extension in place when nvcc is here (no-op otherwise); KFAC_KERNELS_CUDA=1
# makes a failed build an error (auto mode would fall back to pure Python quietly).
if command -v nvcc >/dev/null 2>&1 && [ -f CMakeLists.txt ]; then
  KFAC_KERNELS_CUDA=1 timeout 85 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1 \
    || echo "build of _C failed: see build.log"
  "$py" -c "from kfac_kernels import _cext; print('kfac_kernels._C:', _cext.status()[1])" 2>&1 | tee -a "$out/env.txt"
fi

timeout 115 "$py" -m pytest tests -m gpu -q -x --timeout 105 -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -n 25
# pyproject.toml collects bench_*.py and disables timing by default (CPU smoke): enable it here.
timeout 160 "$py" -m pytest benchmarks -q -p no:cacheprovider --benchmark-enable \
  --ignore=benchmarks/bench_step.py --benchmark-json="$out/bench.json" \
  --benchmark-min-rounds=5 --benchmark-warmup=on --benchmark-max-time=0.5 2>&1 | tail -n 15
# The full-step benchmark (K-FAC vs AdamW, GPT-2 small, 100-step periods) times its own rounds.
timeout 90 "$py" -m pytest benchmarks/bench_step.py -q -p no:cacheprovider --benchmark-enable \
  --benchmark-json="$out/step.json" 2>&1 | tail -n 6
"$py" benchmarks/summarize.py "$out/bench.json" "$out/step.json" --markdown "$out/summary.md"
# Optimizer step time (kfac_kernels SOAP / Shampoo, batched and looped, against heavyball SOAP eager
# when heavyball is installed; its compiled row is left out here, its compile alone can use the
# whole minute): full GPT-2 small blocks. The page is rewritten after each case, so a timeout
# keeps the autoencoder case; a failure is reported and does not stop the script.
timeout 60 "$py" benchmarks/optim_step_time.py --device cuda --cases autoencoder,gpt2 --blocks 12 \
  --optimizers kk-soap,kk-shampoo,kk-soap-looped,kk-shampoo-looped,heavyball-soap \
  --out "$out/optim_step_time.md" > "$out/optim_step_time.log" 2>&1 \
  || echo "optim_step_time.py failed or timed out (rc $?): see optim_step_time.log"
tail -n 5 "$out/optim_step_time.log" 2>/dev/null
# Muon (kfac_kernels.optim.Muon batched and looped, ops.newton_schulz on Triton) against
# torch.optim.Muon (+ AdamW for the non-matrix parameters), full GPT-2 small blocks.
timeout 30 "$py" benchmarks/optim_step_time.py --device cuda --cases gpt2 --blocks 12 \
  --optimizers kk-muon,kk-muon-looped,torch-muon --period 5 --rounds 3 \
  --out "$out/optim_step_time_muon.md" > "$out/optim_step_time_muon.log" 2>&1 \
  || echo "optim_step_time.py (Muon) failed or timed out (rc $?): see optim_step_time_muon.log"
tail -n 3 "$out/optim_step_time_muon.log" 2>/dev/null
# K-FAC's per-step overhead against Adam/AdamW (benchmarks/bench_overhead.py): step-time ratios
# and aten calls per phase, the demo models first (the page is rewritten after each row).
timeout 40 "$py" benchmarks/bench_overhead.py --device cuda --rounds 5 --threads 4 \
  --out "$out/overhead.md" > "$out/overhead.log" 2>&1 \
  || echo "bench_overhead.py failed or timed out (rc $?): see overhead.log"
grep -E "^## |^step:" "$out/overhead.md" 2>/dev/null
