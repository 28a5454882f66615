#!/usr/bin/env bash
# The main job on this machine, with no cluster: a tiny pre-train, then a fine-tune from it (--cluster local).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export MBL_HOME=${MBL_HOME:-$PWD/runs/.mbl}
.venv/bin/mbl submit examples/pretrain-tiny.yaml "$@"
.venv/bin/mbl submit examples/finetune-tiny.yaml "$@"
.venv/bin/mbl list
