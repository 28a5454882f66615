"""Names and codes shared by the launcher (host side) and the trainer (jobs/, inside the job).

The run directory on shared storage looks like this:

    <run_dir>/
      spec.yaml            the resolved spec the job runs (written by `mbl submit`)
      logs/                one log per attempt (local: local-<n>.log; Slurm: attempt-<n>.log), and
                           outcome-<job>-<attempt>.<host>-<pid>.json: how each node's attempt ended (launcher/outcomes.py)
      lease/               the trainer's lease: which job writes here now (jobs/lease.py)
      data/                packed token shards when a pretrain prepares its own data
      checkpoints/step-NNNNNNNN/   complete checkpoints (a COMPLETE marker inside)
      latest               text file naming the newest complete checkpoint folder
      metrics.jsonl        one JSON object per logged step / evaluation (rank 0)
      tb/                  TensorBoard events
      tracking.json        the tracker runs of this run directory (MLflow, W&B) and the last step each got (jobs/tracking.py)
      final/               the exported Hugging Face model folder
      summary.json         final metrics
      DONE                 written last: the job finished; starting it again exits 0 at once
"""

SPEC_FILE = "spec.yaml"
LOGS_DIR = "logs"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
DONE_FILE = "DONE"
TRACKING_FILE = "tracking.json"
COMPLETE_MARKER = "COMPLETE"

# ---- rank exit codes (python -m jobs.train) ----------------------------------------------------------
# A rank exits with this code after saving on SIGUSR1/SIGTERM or near the time limit: "requeue me".
# (75 is EX_TEMPFAIL of sysexits.h.)
REQUEUE_EXIT_CODE = 75
# A rank exits with this code on bad input (a missing data file, a changed spec): never worth a retry.
USAGE_EXIT_CODE = 2
# A rank's watchdog (jobs/watchdog.py) saw no progress for distributed.hang_timeout_seconds: stacks in the
# log, then this code; the attempt is requeued from the newest checkpoint.
HANG_EXIT_CODE = 76
# The preflight (jobs/preflight.py) found a bad node: named in the log and in logs/bad-nodes-<job>; the
# attempt is requeued, on Slurm without those nodes.
NODE_EXIT_CODE = 77

# ---- launch outcomes (python -m jobs.launch, one per node) -------------------------------------------
# One exit code per outcome; every backend reads them the same way (see jobs/launch.py for the table).
LAUNCH_DONE = 0  # the job is complete
LAUNCH_FAILED = 1  # failed for good: restarting would not help (bad input, no progress, restarts used up)
# Run me again: the ranks saved on a signal, or a crash after progress with restarts left. 128 + SIGTERM,
# because the training operator's ExitCode restart policy retries exit codes >= 128 only.
LAUNCH_REQUEUE = 143
LEASE_DIR = "lease"  # the trainer's lease: one writer per run directory (jobs/lease.py)
