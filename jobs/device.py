"""Where the trainer's tensors live: batches copied to the engine's device, and deterministic kernels.

A leaf module (it imports nothing of the project), so that the loop, the kinds and the tasks can all use it.
"""

from __future__ import annotations

import os

CUBLAS_WORKSPACE = ":4096:8"  # a fixed cuBLAS workspace: deterministic cuBLAS results (CUDA >= 10.2)


def to_device(batch: dict, device) -> dict:
    """A batch of host tensors on `device`. On CUDA each tensor is copied into pinned memory first, so that the
    copy to the GPU is asynchronous (non_blocking) and overlaps the work already queued; elsewhere a plain move."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def set_deterministic() -> None:
    """train.deterministic: the same numbers on every run of the same spec, on a GPU as on the CPU. Called
    before the first CUDA call (cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts); an op without a
    deterministic kernel then raises instead of running."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    import torch

    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
