#!/usr/bin/env bash
# The trainer on one NVIDIA GPU, end to end, in a few minutes. Run it from a clone: ./scripts/gpu-check.sh
#
#   1. the tiny pre-train (examples/pretrain-tiny.yaml, 1 GPU, bf16, NCCL, train.deterministic) uninterrupted;
#   2. the same spec in a second run directory, SIGUSR1 to its launch process mid-run: the rank saves and the
#      launch exits 143 (requeue); started again, it resumes from that checkpoint and finishes;
#   3. final/model.safetensors of both runs byte for byte equal;
#   4. a fine-tune (examples/finetune-tiny.yaml) from the first pre-train.
#
# Each job starts as the local backend starts it, without its supervisor: `python -m jobs.launch --spec SPEC --
# <torchrun args from launcher.torchrun>`. Prints the card, the versions and a PASS/FAIL table; exits 0 when
# every row passes. Installs what is missing: if no Python here imports torch (with CUDA), deepspeed and
# transformers, a venv in ~/.cache/mbl/gpu-check-venv with `pip install -e .[trainer]` (not counted in the time).
#
# Environment: MBL_PYTHON (a Python to try first), MBL_GPU_CHECK_DIR (where the run directories go; default a
# new folder under /tmp), MBL_GPU_CHECK_ALLOW_CPU=1 (no GPU: the same checks on the CPU with gloo and fp32,
# to test this script; it proves nothing about GPUs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
ALLOW_CPU=${MBL_GPU_CHECK_ALLOW_CPU:-0}
WORK=${MBL_GPU_CHECK_DIR:-$(mktemp -d /tmp/mbl-gpu-check.XXXXXX)}
mkdir -p "$WORK"
SIGNAL_AT=60      # send SIGUSR1 once run B logged this step (checkpoints are at 50 and 100)
LIMIT_SECONDS=300 # the checks (not the installation) must finish within this on one GPU

ROWS=()
say() { echo "[gpu-check] $*"; }
row() { ROWS+=("$1|$2|$3"); say "$2: $1: $3"; }
die() { say "error: $*"; exit 2; }

# ---- the card ---------------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  nvidia-smi
  GPU=1
elif [ "$ALLOW_CPU" = 1 ]; then
  say "no NVIDIA GPU; MBL_GPU_CHECK_ALLOW_CPU=1: running the same checks on the CPU (gloo, fp32)"
  GPU=0
else
  die "nvidia-smi finds no NVIDIA GPU (MBL_GPU_CHECK_ALLOW_CPU=1 runs the checks on the CPU instead)"
fi

# ---- a Python that has the trainer ------------------------------------------------------------------------
# shellcheck source=scripts/lib/trainer.sh
source "$REPO/scripts/lib/trainer.sh"
find_trainer_python "$GPU" || die "no Python can run the trainer"
say "python: $PY"
"$PY" - <<'PY'
import platform
import deepspeed, torch, transformers
cuda = torch.cuda.is_available()
print(f"[gpu-check] python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if cuda else None}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version())) if cuda else None}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}")
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"[gpu-check] device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
PY

# ---- helpers ------------------------------------------------------------------------------------------------
if [ "$GPU" = 1 ]; then PRECISION=bf16; else PRECISION=fp32; fi
COMMON=("distributed.gpus_per_node=1" "train.precision=$PRECISION" "train.deterministic=true")

last_step() {  # RUN_DIR: the last step in metrics.jsonl (0 when none yet)
  local s
  s=$(grep -o '"step": [0-9]*' "$1/metrics.jsonl" 2>/dev/null | tail -n 1 | grep -o '[0-9]*$')
  echo "${s:-0}"
}

elapsed() { echo $(( $(date +%s) - $1 )); }

T0=$(date +%s)
A=$WORK/pretrain-a
B=$WORK/pretrain-b
F=$WORK/finetune
rm -rf "$A" "$B" "$F"

# ---- 1. uninterrupted -----------------------------------------------------------------------------------
t=$(date +%s)
spec_a=$(write_spec examples/pretrain-tiny.yaml "$A" "${COMMON[@]}" "train.log_every_steps=5") || die "spec A"
run_job "$spec_a" "$WORK/a.log" gpu-check-a 0
rc=$?
if [ "$rc" = 0 ] && [ -f "$A/final/model.safetensors" ]; then
  row "pre-train, uninterrupted" PASS "exit 0 in $(elapsed "$t") s; $(grep -o 'weights [a-z0-9]* on [a-z:0-9]*' "$WORK/a.log" | head -n 1)"
else
  row "pre-train, uninterrupted" FAIL "exit $rc; see $WORK/a.log"
fi

# ---- 2. SIGUSR1 mid-run, then resume ------------------------------------------------------------------------
t=$(date +%s)
spec_b=$(write_spec examples/pretrain-tiny.yaml "$B" "${COMMON[@]}" "train.log_every_steps=5") || die "spec B"
launch "$spec_b" "$WORK/b.log" gpu-check-b 0
while kill -0 "$LAUNCH_PID" 2>/dev/null && [ "$(last_step "$B")" -lt "$SIGNAL_AT" ]; do
  sleep 0.05
done
sent=$(last_step "$B")
kill -USR1 "$LAUNCH_PID" 2>/dev/null
wait "$LAUNCH_PID"
rc=$?
latest=$(cat "$B/latest" 2>/dev/null)
saved=$((10#$(echo "${latest:-step-0}" | grep -o '[0-9]*$')))
if [ "$rc" = 143 ] && [ ! -f "$B/DONE" ] && [ "$saved" -ge "$sent" ] && [ "$saved" -gt 0 ]; then
  row "SIGUSR1 mid-run: save, exit 143" PASS "signal after step $sent, saved step $saved (${latest}), exit 143"
else
  row "SIGUSR1 mid-run: save, exit 143" FAIL "signal after step $sent: exit $rc, latest '${latest}'; see $WORK/b.log"
fi
run_job "$spec_b" "$WORK/b.log" gpu-check-b 1
rc=$?
if [ "$rc" = 0 ] && grep -q "resumed from checkpoints/step-$(printf %08d "$saved")" "$WORK/b.log"; then
  row "resume to the end" PASS "resumed from step $saved, exit 0 ($(elapsed "$t") s for both attempts)"
else
  row "resume to the end" FAIL "exit $rc; see $WORK/b.log"
fi

# ---- 3. the same weights ----------------------------------------------------------------------------------
if cmp -s "$A/final/model.safetensors" "$B/final/model.safetensors"; then
  row "final weights: interrupted == uninterrupted" PASS "final/model.safetensors byte-identical"
else
  diff=$("$PY" - "$A/final/model.safetensors" "$B/final/model.safetensors" 2>&1 <<'PY'
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
worst = max(((x - b[k]).abs().max().item(), k) for k, x in a.items())
print(f"largest difference {worst[0]:.3g} in {worst[1]}")
PY
)
  row "final weights: interrupted == uninterrupted" FAIL "they differ: ${diff:-a file is missing}"
fi

# ---- device metrics ------------------------------------------------------------------------------------------
metrics=$("$PY" - "$A/metrics.jsonl" 2>&1 <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "split" not in r]
last = rows[-1]
print(f"max_memory_gib {last['max_memory_gib']}, mfu {last['mfu']:.4f}, tokens/s {last['tokens_per_s']:.0f}"
      if "mfu" in last else f"no GPU metrics (tokens/s {last['tokens_per_s']:.0f})")
PY
)
if [ "$GPU" = 0 ]; then
  row "GPU memory and MFU in metrics.jsonl" SKIP "CPU run: $metrics"
elif [[ "$metrics" == max_memory_gib* ]]; then
  row "GPU memory and MFU in metrics.jsonl" PASS "$metrics"
else
  row "GPU memory and MFU in metrics.jsonl" FAIL "$metrics"
fi

# ---- 4. fine-tune ------------------------------------------------------------------------------------------
t=$(date +%s)
spec_f=$(write_spec examples/finetune-tiny.yaml "$F" "${COMMON[@]}" "model.init_from=$A") || die "spec F"
run_job "$spec_f" "$WORK/f.log" gpu-check-f 0
rc=$?
scores=$("$PY" - "$F/summary.json" 2>/dev/null <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
acc, base = s["test"]["accuracy"], s["test_baseline"]["accuracy"]
print(f"{'ok' if acc >= base + 0.2 else 'low'} test accuracy {acc:.3f} (majority baseline {base:.3f})")
PY
)
if [ "$rc" = 0 ] && [[ "$scores" == ok* ]]; then
  row "fine-tune from the pre-train" PASS "exit 0 in $(elapsed "$t") s; ${scores#ok }"
else
  row "fine-tune from the pre-train" FAIL "exit $rc; ${scores:-no summary}; see $WORK/f.log"
fi

# ---- the table ---------------------------------------------------------------------------------------------
total=$(elapsed "$T0")
if [ "$GPU" = 0 ]; then
  row "within $LIMIT_SECONDS s" SKIP "$total s on the CPU"
elif [ "$total" -le "$LIMIT_SECONDS" ]; then
  row "within $LIMIT_SECONDS s" PASS "$total s"
else
  row "within $LIMIT_SECONDS s" FAIL "$total s"
fi
table() {
  printf '%-46s %-5s %s\n' "check" "" "detail"
  for r in "${ROWS[@]}"; do
    IFS='|' read -r name status detail <<<"$r"
    printf '%-46s %-5s %s\n' "$name" "$status" "$detail"
  done
}
echo
table | tee "$WORK/results.txt"
echo
say "logs and run directories: $WORK"
for r in "${ROWS[@]}"; do
  [[ "$r" == *"|FAIL|"* ]] && exit 1
done
exit 0
