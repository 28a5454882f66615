#!/usr/bin/env bash
# ModernBERT-base MLM at 1024 tokens in bf16 on this machine's NVIDIA GPUs, through jobs.train, against the
# Hugging Face Trainer on the same model, data and batch, in the same run. Run it from a clone: ./bench/gpu.sh
#
# Rows (each a real training run started the way the local backend starts it, `python -m jobs.launch`):
#   mbl  sdpa  micro batch 16, 32, 64 (ZeRO-1, DeepSpeed bf16, one process per GPU, accumulation 1)
#   hf   Trainer(bf16=True, its default AdamW, DataCollatorForLanguageModeling at 30%) at micro batch 32, 1 GPU
#   mbl  sdpa  + train.compile (the encoder) at micro batch 32
#   mbl  flash_attention_2 at micro batch 32, when the flash-attn package imports (else the row says why not)
# Each run trains STEPS steps and logs every LOG steps; the first interval (warm-up, compilation) is dropped and
# the median of the others is reported: tokens/s per GPU, MFU (6 x parameters x tokens/s over MBL_PEAK_TFLOPS,
# default 989 per GPU, the H100/H200 dense bf16 peak; attention FLOPs not counted), peak memory allocated, and the
# loader's share of the step time (`data_share` in metrics.jsonl: host time building batches and starting their
# copies). Data: the synthetic corpus (examples/data/corpus.txt) tokenized and packed at 1024 by a `prepare` job;
# the model's vocabulary is ModernBERT's 50,368 (model.config_overrides) so the MLM head costs what it costs.
#
# Writes one results file, $MBL_GPU_BENCH_OUT (default bench/results/gpu-<host>-<date>.jsonl), one JSON object
# per row plus a header row, and prints a table. The whole run stays within MBL_GPU_BENCH_BUDGET seconds
# (default 480; the rows run in the order above): rows that would not fit are skipped and marked so. Environment: MBL_PYTHON as for
# scripts/gpu-check.sh; MBL_GPU_BENCH_ALLOW_CPU=1 runs the same rows with the tiny preset at 128 tokens on the
# CPU in fp32 (to test this script; it measures nothing about GPUs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
BUDGET=${MBL_GPU_BENCH_BUDGET:-480}
STEPS=${MBL_GPU_BENCH_STEPS:-40}
LOG=${MBL_GPU_BENCH_LOG:-10}
WORK=${MBL_GPU_BENCH_DIR:-$(mktemp -d /tmp/mbl-gpu-bench.XXXXXX)}
T0=$(date +%s)
say() { echo "[gpu-bench] $*"; }
die() { say "error: $*"; exit 2; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPU=1
  NGPU=$(nvidia-smi -L | grep -c '^GPU')
  PRESET=base SEQ=1024 PRECISION=bf16 MBS=(16 32 64) REF_MB=32 VOCAB=50368
elif [ "${MBL_GPU_BENCH_ALLOW_CPU:-0}" = 1 ]; then
  GPU=0 NGPU=1
  PRESET=tiny SEQ=128 PRECISION=fp32 MBS=(4 8) REF_MB=8 VOCAB=1024 STEPS=${MBL_GPU_BENCH_STEPS:-12} LOG=${MBL_GPU_BENCH_LOG:-4}
  say "no NVIDIA GPU; MBL_GPU_BENCH_ALLOW_CPU=1: tiny preset, fp32, on the CPU (tests the script only)"
else
  die "nvidia-smi finds no NVIDIA GPU (MBL_GPU_BENCH_ALLOW_CPU=1 runs the rows on the CPU instead)"
fi
OUT_FILE=${MBL_GPU_BENCH_OUT:-bench/results/gpu-$(hostname -s)-$(date +%Y%m%d-%H%M).jsonl}
mkdir -p "$WORK" "$(dirname "$OUT_FILE")"
# shellcheck source=scripts/lib/trainer.sh
source "$REPO/scripts/lib/trainer.sh"
find_trainer_python "$GPU" || die "no Python can run the trainer"

"$PY" - "$OUT_FILE" "$NGPU" "$SEQ" "$PRESET" <<'PY'
import json, platform, socket, sys, time
import deepspeed, torch, transformers
out, ngpu, seq, preset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cuda = torch.cuda.is_available()
head = {"row": "header", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": ngpu, "seq_len": seq, "preset": preset,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
try:
    import flash_attn
    head["flash_attn"] = flash_attn.__version__
except ImportError as exc:
    head["flash_attn"] = None
    head["flash_attn_missing"] = str(exc)
print("[gpu-bench]", json.dumps(head))
open(out, "w").write(json.dumps(head) + "\n")
PY
[ -s "$OUT_FILE" ] || die "could not write $OUT_FILE"

# ---- data: the corpus tokenized and packed at SEQ ---------------------------------------------------------------
DATA=$WORK/prepare
spec=$(write_spec examples/prepare-tiny.yaml "$DATA" "data.seq_len=$SEQ" "data.vocab_size=8192" \
  "distributed.gpus_per_node=1" "resources.time_limit=00:10:00") || die "prepare spec"
run_job "$spec" "$WORK/prepare.log" bench-prepare 0 || die "prepare failed; see $WORK/prepare.log"
say "data prepared in $(( $(date +%s) - T0 )) s"

record() {  # NAME RUN_DIR MB EXTRA_JSON: the medians of RUN_DIR/metrics.jsonl (first interval dropped) -> OUT_FILE
  "$PY" - "$OUT_FILE" "$1" "$2" "$3" "$NGPU" "$SEQ" "$4" <<'PY'
import json, statistics, sys
out, name, run_dir, mb, ngpu, seq, extra = sys.argv[1:]
ngpu = int(ngpu)
row = {"row": name, "micro_batch": int(mb), "tokens_per_step_per_gpu": int(mb) * int(seq), **json.loads(extra)}
try:
    rows = [r for r in map(json.loads, open(f"{run_dir}/metrics.jsonl")) if "split" not in r and "tokens_per_s" in r]
except OSError:
    rows = []
steady = rows[1:] or rows
if steady:
    med = lambda k: statistics.median(r[k] for r in steady) if all(k in r for r in steady) else None
    row.update(tokens_per_s_per_gpu=round(med("tokens_per_s") / ngpu), mfu=med("mfu"),
               max_memory_gib=max((r.get("max_memory_gib") or 0) for r in steady) or None,
               data_share=med("data_share"), intervals=len(steady), loss_last=steady[-1]["loss"])
else:
    row.setdefault("skipped", "no metrics: the run failed (see its log)")
print("[gpu-bench]", json.dumps(row))
open(out, "a").write(json.dumps(row) + "\n")
PY
}

bench_mbl() {  # NAME MB SET...: one jobs.train run; needs ~90 s (+ compile) of the budget
  local name=$1 mb=$2 need=${NEED:-75}; shift 2
  if [ "$(left)" -lt "$need" ]; then
    record "$name" /nonexistent "$mb" "{\"skipped\": \"over the ${BUDGET} s budget\"}"
    return
  fi
  local dir=$WORK/$name t=$(date +%s) s
  s=$(write_spec examples/pretrain-tiny.yaml "$dir" "model.preset=$PRESET" "model.config_overrides.vocab_size=$VOCAB" \
      "data.prepared=$DATA" "data.seq_len=$SEQ" "train.precision=$PRECISION" "train.max_steps=$STEPS" \
      "train.warmup_steps=0" "train.micro_batch_size=$mb" "train.global_batch_size=$((mb * NGPU))" \
      "train.lr=0.0008" "train.log_every_steps=$LOG" "train.eval_every_steps=$STEPS" "train.eval_batches=1" \
      "checkpoint.every_steps=$STEPS" "checkpoint.keep_last=1" "distributed.gpus_per_node=$NGPU" \
      "resources.time_limit=00:20:00" "$@") || { record "$name" /nonexistent "$mb" '{"skipped": "spec"}'; return; }
  launch "$s" "$WORK/$name.log" "bench-$name" 0
  local sent=0
  while kill -0 "$LAUNCH_PID" 2>/dev/null; do  # past the budget: SIGTERM, the way a cluster ends a job
    if [ "$sent" = 0 ] && [ "$(left)" -le 0 ]; then kill -TERM "$LAUNCH_PID"; sent=1; fi
    sleep 1
  done
  wait "$LAUNCH_PID"
  local rc=$?
  record "$name" "$dir" "$mb" "{\"runner\": \"mbl\", \"exit\": $rc, \"wall_s\": $(( $(date +%s) - t )), \"sets\": \"$*\"}"
  [ "$rc" = 0 ] || { say "$name: exit $rc; the end of its log:"; tail -n 15 "$WORK/$name.log"; }
}

for mb in "${MBS[@]}"; do
  bench_mbl "mbl-sdpa-mb$mb" "$mb" "model.attention=sdpa"
done
# ---- the Hugging Face Trainer baseline ----------------------------------------------------------------------
if [ "$(left)" -ge 75 ]; then
  t=$(date +%s)
  timeout "$(left)" "$PY" bench/gpu_hf_trainer.py --data "$DATA/data" --preset "$PRESET" --vocab "$VOCAB" \
    --micro-batch "$REF_MB" --steps "$STEPS" --log "$LOG" --precision "$PRECISION" --out "$OUT_FILE" \
    >"$WORK/hf.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || { say "hf trainer: exit $rc; the end of its log:"; tail -n 20 "$WORK/hf.log"; \
    "$PY" -c "import json,sys; open(sys.argv[1],'a').write(json.dumps({'row': 'hf-trainer-mb$REF_MB', 'skipped': 'exit $rc'})+'\n')" "$OUT_FILE"; }
  say "hf trainer: $(( $(date +%s) - t )) s"
else
  record "hf-trainer-mb$REF_MB" /nonexistent "$REF_MB" "{\"skipped\": \"over the ${BUDGET} s budget\"}"
fi


NEED=150 bench_mbl "mbl-sdpa-compile-mb$REF_MB" "$REF_MB" "model.attention=sdpa" "train.compile=true"
if "$PY" -c "import flash_attn" 2>/dev/null; then
  bench_mbl "mbl-flash2-mb$REF_MB" "$REF_MB" "model.attention=flash_attention_2"
else
  record "mbl-flash2-mb$REF_MB" /nonexistent "$REF_MB" '{"skipped": "flash-attn does not import here (no wheel for this torch/CUDA; building it takes hours)"}'
fi

echo
"$PY" bench/gpu_report.py "$OUT_FILE"
say "results: $OUT_FILE; logs and run directories: $WORK; $(( $(date +%s) - T0 )) s in all"
