#!/usr/bin/env bash
# Real-shape benchmarks at full depth (32 layers) in bf16 on one GPU, in <= 8 minutes: per analysis the cost per
# query in clean-forward units, queries/s, peak memory per query and the share of the FLOP floor reached
# (benchmarks/bench_width.py), then the two-hop study estimate from those numbers (benchmarks/study_estimate.py).
# Then, time permitting, the acceptance ratios against their baselines at the Llama-3-8B shape in fp32.
#
#   bash benchmarks/gpu_check.sh          # on a GPU machine; results under $OUT (default benchmarks/results/gpu)
#   bash benchmarks/gpu_check.sh --tiny   # the same steps on a tiny Llama-layout model (CPU or GPU), ~1 minute
#
# Needs torch (CUDA build), transformers, transformer-lens and this repository's dependencies; the package is used
# from the checkout (PYTHONPATH). The GPU image lacks transformer-lens: carry the wheels of benchmarks/gpu_wheels.sh
# as `.whl` (they are installed into /tmp/site first).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
START=$(date +%s)
left() { echo $((480 - ($(date +%s) - START))); }
PY=${PYTHON:-python3}
SITE=""
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && SITE=/tmp/site: || echo "== installing the carried wheels failed"
fi
export PYTHONPATH=$SITE$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export MHOP_BENCH_CACHE=${MHOP_BENCH_CACHE:-/tmp/mhop_bench_cache}
echo "== $(date -u) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY - <<'PYEOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "transformer_lens", "tokenizers", "pandas", "jaxtyping", "einops", "click",
             "scipy", "pyarrow", "tqdm"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"  {name} MISSING ({type(e).__name__}: {e})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
$PY -c "import mhop_lens, transformer_lens; print('mhop_lens from', mhop_lens.__file__)" || {
    echo "cannot import mhop_lens / transformer_lens here: nothing to run"; exit 3; }
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

if [ "$TINY" = 1 ]; then
    $PY benchmarks/bench_width.py --quick --shapes tiny-llama --layers 2 --device "$DEVICE" --dtype bf16 \
        --no-accept --json "$OUT/width_bf16.json"
    $PY benchmarks/study_estimate.py --json "$OUT/width_bf16.json"
    $PY benchmarks/bench_width.py --quick --shapes tiny-llama --layers 2 --device "$DEVICE" --dtype fp32 \
        --json "$OUT/width_fp32_accept.json"
    echo "== done in $(( $(date +%s) - START )) s"
    exit 0
fi

for shape in llama3-8b llama2-7b; do
    budget=$(( $(left) - 200 ))
    [ "$budget" -lt 60 ] && { echo "== skip $shape bf16: $(left) s left"; continue; }
    echo "== $shape, 32 layers, bf16 ($budget s max)"
    timeout "$budget" $PY benchmarks/bench_width.py --shapes "$shape" --layers full --device "$DEVICE" \
        --dtype bf16 --queries 32 --no-accept --json "$OUT/width_${shape}_bf16.json" || echo "== $shape: exit $?"
done
$PY - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [r for p in sorted(out.glob("width_*_bf16.json")) for r in json.loads(p.read_text())]
(out / "width_bf16.json").write_text(json.dumps(rows, indent=1))
PYEOF
$PY benchmarks/study_estimate.py --json "$OUT/width_bf16.json" | tee "$OUT/study.txt"
budget=$(( $(left) - 15 ))
if [ "$budget" -ge 90 ]; then
    echo "== acceptance ratios, llama3-8b, 32 layers, fp32 ($budget s max)"
    timeout "$budget" $PY benchmarks/bench_width.py --shapes llama3-8b --layers full --device "$DEVICE" \
        --dtype fp32 --quick --json "$OUT/width_llama3-8b_fp32_accept.json" || echo "== acceptance: exit $?"
else
    echo "== skip the fp32 acceptance run: $(left) s left"
fi
echo "== done in $(( $(date +%s) - START )) s"
