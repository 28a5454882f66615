"""Backends: local (this machine), slurm (sbatch), k8s (PyTorchJob / TrainJob)."""
