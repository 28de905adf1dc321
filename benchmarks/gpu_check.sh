#!/usr/bin/env bash
# The project's GPU check, about 5 minutes on one GPU: the figures the README's "GPUs" section quotes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]     # default OUT_DIR: benchmarks/results/gpu
#
# 1. the GPU-marked tests (`-m gpu`: tests/test_gpu.py's padding invariance, tiny pipeline in bf16 and exact
#    resume; tests/test_generation.py's decode loop drawing what HF generate draws on cuda);
# 2. the default pipeline on cuda (`rlhf run configs/default.yaml run.device=cuda`), its time per stage,
#    its held-out metrics and the GPU's peak memory (nvidia-smi, sampled every 200 ms);
# 3. `rlhf bench` of the default config on cuda in bf16, 6 updates, with the run's trained reward model.
# Python: $PYTHON, else .venv/bin/python, else python3. GPU_CHECK_STEPS picks steps (default 123);
# GPU_CHECK_RUN is the default run's folder (default OUT_DIR/default-run). Exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-benchmarks/results/gpu}
RUN=${GPU_CHECK_RUN:-$OUT/default-run}
STEPS=${GPU_CHECK_STEPS:-123}
mkdir -p "$OUT"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, trl; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, trl {trl.__version__}, {torch.cuda.get_device_name()}')" || exit 1

if [[ $STEPS == *1* ]]; then
echo "== 1. GPU tests"
"$PY" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" || status=1
fi

if [[ $STEPS == *2* ]]; then
echo "== 2. default pipeline on cuda"
rm -rf "$RUN"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/gpu_memory.csv" &
smi=$!
t0=$(date +%s)
"$PY" -m rlhf.cli run configs/default.yaml run.device=cuda "run.output_dir=$RUN" tracking.wandb=off \
  > "$OUT/pipeline.log" 2>&1 || { status=1; tail -30 "$OUT/pipeline.log"; }
t1=$(date +%s)
kill $smi 2>/dev/null
echo "wall time of \`rlhf run\`: $((t1 - t0)) s"
"$PY" - "$RUN" "$OUT/gpu_memory.csv" <<'EOF'
import json, sys
from pathlib import Path
run, mem = Path(sys.argv[1]), Path(sys.argv[2])
total = 0.0
for stage in ("prefs", "reward", "ppo", "eval"):
    done = run / stage / "_done.json"
    if done.exists():
        seconds = json.loads(done.read_text())["seconds"]
        total += seconds
        print(f"{stage:>7}: {seconds:7.1f} s")
    else:
        print(f"{stage:>7}: not finished")
print(f"  stages: {total:7.1f} s")
used = [int(x) for x in mem.read_text().split() if x.strip().isdigit()]
if used:
    print(f"peak GPU memory used (nvidia-smi): {max(used) / 1024:.1f} GiB")
for name in ("reward/metrics.json", "eval/metrics.json"):
    path = run / name
    if path.exists():
        m = json.loads(path.read_text())
        keys = [k for k in ("test_accuracy", "test_gold_accuracy", "test_spearman_gold", "ref_gold", "policy_gold", "gold_gain", "kl", "win_rate_gold",
                            "win_rate_rm", "policy_score", "bon_gold_at_policy_kl") if k in m]
        print(name + ": " + ", ".join(f"{k} {m[k]:.3f}" if isinstance(m[k], float) else f"{k} {m[k]}" for k in keys))
EOF
fi

if [[ $STEPS == *3* ]]; then
echo "== 3. rlhf bench, default config, bf16 on cuda"
"$PY" -m rlhf.cli bench configs/default.yaml run.device=cuda model.dtype=bfloat16 "run.output_dir=$RUN" \
  tracking.wandb=off --updates 6 --json "$OUT/bench.json" 2>&1 | grep -v "^\s*$" | tail -25 || status=1
fi
exit $status
