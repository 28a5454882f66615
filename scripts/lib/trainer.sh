# Shared by scripts/gpu-check.sh and bench/gpu.sh (source it; REPO must be set): a Python that runs the trainer,
# and jobs started the way the local backend starts them, without its supervisor:
# `python -m jobs.launch --spec SPEC -- <torchrun args from launcher.torchrun>`.
#
# find_trainer_python GPU: sets PY to the first of $MBL_PYTHON, $REPO/.venv, ~/.cache/mbl/gpu-check-venv or
# python3 that imports torch (with CUDA when GPU=1), deepspeed, transformers and the repo; installs that venv
# (`pip install -e .[trainer]`) when none does.

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

find_trainer_python() {
  local want_gpu=$1 venv=$HOME/.cache/mbl/gpu-check-venv candidate
  local check="import torch, deepspeed, transformers, launcher.torchrun, jobs.launch, jobs.train
assert torch.cuda.is_available() or '$want_gpu' == '0', 'torch ' + torch.__version__ + ' sees no CUDA device'"
  PY=
  for candidate in ${MBL_PYTHON:-} "$REPO/.venv/bin/python" "$venv/bin/python" python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$check" >/dev/null 2>&1; then
      PY=$(command -v "$candidate")
      return 0
    fi
  done
  echo "[mbl] installing the trainer into $venv (pip install -e .[trainer]; torch with CUDA from PyPI)"
  python3 -m venv "$venv" || { echo "python3 -m venv failed (Debian: apt-get install python3-venv)"; return 2; }
  "$venv/bin/python" -m pip install -q --upgrade pip && "$venv/bin/python" -m pip install -q -e "${REPO}[trainer]" \
    || { echo "pip install -e .[trainer] failed"; return 2; }
  PY=$venv/bin/python
  "$PY" -c "$check" || { echo "the new venv still cannot run the trainer (above: why)"; return 2; }
}

write_spec() {  # EXAMPLE RUN_DIR SET...: the resolved spec in RUN_DIR/spec.yaml, as `mbl submit` writes it
  "$PY" - "$REPO" "$@" <<'PY'
import sys
from pathlib import Path
from launcher.loading import load_spec
from launcher.rundir import write_spec
repo, example, run_dir, *sets = sys.argv[1:]
spec = load_spec(Path(repo) / example, sets=[f"checkpoint.dir={run_dir}", *sets]).resolved(Path(repo))
print(write_spec(spec))
PY
}

launch() {  # SPEC LOG JOB ATTEMPT: the local backend's command for SPEC, in the background; sets LAUNCH_PID
  local args
  mapfile -t args < <("$PY" -c 'import sys
from launcher.loading import load_spec
from launcher.torchrun import torchrun_args
print("\n".join(torchrun_args(load_spec(sys.argv[1]), ["--standalone", "--nnodes=1"])))' "$1")
  MBL_BACKEND=local MBL_JOB_ID=$3 MBL_ATTEMPT=$4 "$PY" -m jobs.launch --spec "$1" -- "${args[@]}" >>"$2" 2>&1 &
  LAUNCH_PID=$!
}

run_job() {  # SPEC LOG JOB ATTEMPT: run to the end; returns the launch's exit code
  launch "$@"
  wait "$LAUNCH_PID"
}
