"""Names and codes shared by the launcher (host side) and the trainer (jobs/, inside the job).

The run directory on shared storage looks like this:

    <run_dir>/
      spec.yaml            the resolved spec the job runs (written by `mbl submit`)
      logs/                one log per attempt (local: local-<n>.log; Slurm: attempt-<n>.log)
      data/                packed token shards when a pretrain prepares its own data
      checkpoints/step-NNNNNNNN/   complete checkpoints (a COMPLETE marker inside)
      latest               text file naming the newest complete checkpoint folder
      metrics.jsonl        one JSON object per logged step / evaluation (rank 0)
      tb/                  TensorBoard events
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
COMPLETE_MARKER = "COMPLETE"

# The trainer exits with this code after saving on SIGUSR1/SIGTERM or near the time limit:
# "requeue me". (75 is EX_TEMPFAIL of sysexits.h.) Any other non-zero code is a real failure.
REQUEUE_EXIT_CODE = 75
