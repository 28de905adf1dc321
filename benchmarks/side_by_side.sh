#!/usr/bin/env bash
# Side-by-side PPO timing against TRL 1.12.0's PPOTrainer
# (protocol: README.md, "Side by side with TRL's PPOTrainer").
# Runs alternate (ours, peer, ours, peer ...) so that drift of the machine hits both alike.
#   bash benchmarks/side_by_side.sh [ROUNDS] [UPDATES]    -> benchmarks/results/*.json, then a summary
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
UPDATES=${2:-6}
PEER=${PEER_VENV:-.peer-venv}/bin/python
OUT=benchmarks/results
mkdir -p "$OUT"
if [ ! -x "$PEER" ]; then
  echo "no peer venv at ${PEER_VENV:-.peer-venv}: python -m venv .peer-venv && .peer-venv/bin/pip install torch==2.13.0 trl==1.12.0 psutil" >&2
  exit 2
fi
TINY=$(.venv/bin/python -c "from rlhf.models import resolve_model; print(resolve_model('tiny-llama'))")
SMOL=$(.venv/bin/python -c "from rlhf.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
for round in $(seq 1 "$ROUNDS"); do
  for epochs in 1 2; do
    .venv/bin/rlhf bench benchmarks/same_work_tiny.yaml ppo.ppo_epochs=$epochs --updates "$UPDATES" \
      --json "$OUT/ours_tiny_e${epochs}_r${round}.json" > /dev/null 2>&1
    "$PEER" benchmarks/trl_peer.py --model "$TINY" --batch 16 --epochs $epochs --updates "$UPDATES" \
      --json-out "$OUT/peer_tiny_e${epochs}_r${round}.json" > /dev/null 2>&1
    .venv/bin/rlhf bench benchmarks/same_work_smollm2.yaml ppo.ppo_epochs=$epochs --updates "$UPDATES" \
      --json "$OUT/ours_smollm2_e${epochs}_r${round}.json" > /dev/null 2>&1
    "$PEER" benchmarks/trl_peer.py --model "$SMOL" --batch 8 --epochs $epochs --updates "$UPDATES" \
      --json-out "$OUT/peer_smollm2_e${epochs}_r${round}.json" > /dev/null 2>&1
    .venv/bin/rlhf bench benchmarks/fast_smollm2.yaml ppo.ppo_epochs=$epochs --updates "$UPDATES" \
      --json "$OUT/fast_smollm2_e${epochs}_r${round}.json" > /dev/null 2>&1
    echo "round $round, epochs $epochs done" >&2
  done
done
.venv/bin/python benchmarks/summarize.py "$OUT"
