"""Backends: local (this machine), slurm (sbatch), k8s (PyTorchJob / TrainJob), and the factory.

The interface is in base.py; each implementation imports it, and only this factory knows them all. It
imports lazily: the Kubernetes client only when it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.backends.base import Backend

BACKENDS = ("local", "slurm", "k8s")


def get_backend(name: str, **options: object) -> "Backend":
    """The backend for `--cluster NAME`."""
    if name == "local":
        from launcher.backends.local import LocalBackend

        return LocalBackend(**options)  # type: ignore[arg-type]
    if name == "slurm":
        from launcher.backends.slurm import SlurmBackend

        return SlurmBackend(**options)  # type: ignore[arg-type]
    if name == "k8s":
        from launcher.backends.k8s import K8sBackend

        return K8sBackend(**options)  # type: ignore[arg-type]
    from launcher.errors import UsageError

    raise UsageError(f"unknown cluster {name!r}", hint="use --cluster local, --cluster slurm or --cluster k8s")
