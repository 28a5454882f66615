"""The trainer: what runs inside the job on every rank (`python -m jobs.train --spec spec.yaml`).

Importing the package registers ModernBertForPreTraining with transformers' AutoModelForPreTraining
(see jobs.model) when the trainer's dependencies are installed.
"""

try:  # the launcher's environment may lack torch/transformers; the trainer's has them
    from jobs import model as _model  # noqa: F401
except ImportError:  # pragma: no cover
    pass
