#!/usr/bin/env bash
# Everything the tests need, then the tests: the Python environment, the trainer image (podman, cached),
# the local Slurm cluster, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/images/containers.conf}"
MBL_IMAGE="$(./images/setup.sh)"
# MBL_SLURM_CLEAR=1: jobs an earlier run left in the dev cluster's queue would hold its nodes.
MBL_SLURM_CLEAR=1 ./slurm/dev/up.sh
# shellcheck disable=SC1091
source "${MBL_SLURM_DIR:-/tmp/mbl-slurm}/env.sh"
export MBL_REQUIRE_SLURM=1 MBL_REQUIRE_CONTAINERS=1 MBL_IMAGE
# Two workers: one runs everything that uses the Slurm cluster or podman, in order; the other the rest, a
# file at a time (tests/conftest.py groups them). Most of the suite waits on jobs, so this halves its time.
exec .venv/bin/python -m pytest -ra --durations=15 -n 2 --dist loadgroup "$@"
