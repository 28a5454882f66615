#!/usr/bin/env bash
# The main job on this machine, with no cluster: a tiny pre-train, then a fine-tune from it (--cluster local).
# Extra arguments go to both `mbl submit` calls (e.g. --set train.seed=1). Run again: finished jobs exit at once.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export MBL_HOME=${MBL_HOME:-$PWD/runs/.mbl}
start=$(date +%s)
.venv/bin/mbl submit examples/pretrain-tiny.yaml "$@"
.venv/bin/mbl submit examples/finetune-tiny.yaml "$@"
.venv/bin/mbl list
.venv/bin/mbl plot runs/tiny-pretrain runs/tiny-finetune -o runs/main-job.png   # the curves of both runs
.venv/bin/python - "$(( $(date +%s) - start ))" <<'PY'
import json, sys
pre = json.load(open("runs/tiny-pretrain/summary.json"))
fin = json.load(open("runs/tiny-finetune/summary.json"))
print(f"\nmain job done in {sys.argv[1]} s")
print(f"  pre-train : held-out MLM loss {pre['heldout_loss_start']:.2f} -> {pre['heldout_loss']:.2f}, "
      f"perplexity {pre['perplexity']:.1f}   model: {pre['final_dir']}")
print(f"  fine-tune : test accuracy {fin['test']['accuracy']:.3f} (majority baseline "
      f"{fin['test_baseline']['accuracy']:.3f}), macro F1 {fin['test']['f1']:.3f}   model: {fin['final_dir']}")
PY
