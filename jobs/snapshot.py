"""A checkpoint's state copied to host memory, so that its write can run while training goes on.

`Snapshot.copy(obj)` returns obj with every tensor replaced by one in host memory: dicts, lists and tuples
are walked (their types kept, an object met twice stays one object), and each tensor storage is copied once,
whole, into a host buffer, with the tensor a view of it at the same offset, size and stride. So
`torch.save` of the copy writes the same bytes as `torch.save` of the original (same storages, same
sharing, nn.Parameter and requires_grad kept), and training may change the originals as soon as `ready()`
returned. Anything else that is not immutable is deep-copied.

On CUDA the buffers are pinned and the copies non-blocking, queued on the current stream behind the step
that produced the state; `ready()` waits for them. `HostPool` keeps the buffers between saves: the next save
of the same model reuses them, so only the first save pays for allocating (and pinning) them. A buffer goes
back to the pool once the write that used it is over (`Snapshot.release`). The host memory this takes is one
checkpoint shard of this rank (the whole checkpoint with one rank); PyTorch's pinned allocator rounds each
buffer up to a power of two unless PYTORCH_CUDA_ALLOC_CONF sets pinned_max_round_threshold_mb.
"""

from __future__ import annotations

import copy
import enum

import torch

_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, range, torch.dtype, torch.device, torch.Size,
              enum.Enum)


class HostPool:
    """Host buffers (uint8 tensors) by size, reused from one save to the next."""

    def __init__(self):
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self.allocated = 0  # bytes ever allocated (for the log and the benchmarks)

    def take(self, nbytes: int, pinned: bool) -> torch.Tensor:
        free = self._free.get((nbytes, pinned))
        if free:
            return free.pop()
        self.allocated += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pinned)

    def give_back(self, buffers: list[torch.Tensor]) -> None:
        for buf in buffers:
            self._free.setdefault((buf.numel(), buf.is_pinned()), []).append(buf)


class Snapshot:
    """Host copies of the tensors of one checkpoint; `ready()` before handing them to another thread."""

    def __init__(self, pool: HostPool):
        self.pool = pool
        self.buffers: list[torch.Tensor] = []
        self.nbytes = 0
        self._storages: dict[int, torch.Tensor] = {}  # source storage -> its host buffer
        self._memo: dict[int, object] = {}  # id(source object) -> its copy
        self._keep: list[object] = []  # the sources, so that no id in the memo is reused meanwhile
        self._streams: set[torch.device] = set()

    def copy(self, obj):
        key = id(obj)
        if key in self._memo:
            return self._memo[key]
        if isinstance(obj, torch.Tensor):
            out = self._tensor(obj)
        elif isinstance(obj, _IMMUTABLE):
            return obj
        elif isinstance(obj, dict):
            out = copy.copy(obj)  # the same type (OrderedDict, with a state dict's _metadata), then its values
            self._memo[key] = out
            for k, v in obj.items():
                out[k] = self.copy(v)
        elif type(obj) is list:
            out = []
            self._memo[key] = out
            out.extend(self.copy(v) for v in obj)
        elif type(obj) is tuple:
            out = tuple(self.copy(v) for v in obj)
        else:
            out = copy.deepcopy(obj)
        self._memo[key] = out
        self._keep.append(obj)
        return out

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized:
            return t.detach().to("cpu", copy=True)  # not met in DeepSpeed's states; copied, sharing not kept
        source = t.untyped_storage()
        buf = self._storages.get(source._cdata)
        if buf is None:
            cuda = source.device.type == "cuda"
            buf = self.pool.take(source.nbytes(), pinned=cuda)
            if source.nbytes():
                buf.copy_(torch.empty(0, dtype=torch.uint8, device=source.device).set_(source), non_blocking=cuda)
            if cuda:
                self._streams.add(source.device)
            self.buffers.append(buf)
            self.nbytes += source.nbytes()
            self._storages[source._cdata] = buf
            self._keep.append(source)
        host = torch.empty(0, dtype=t.dtype, device="cpu")  # device named: MBL_DEVICE_CHECK leaves it unmarked
        out = host.set_(buf.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=t.requires_grad)
        return out.requires_grad_(t.requires_grad) if t.requires_grad and t.is_floating_point() else out

    def ready(self) -> None:
        """Wait for the copies queued on CUDA streams; then drop the references to the sources."""
        for device in self._streams:
            torch.cuda.current_stream(device).synchronize()
        self._streams.clear()
        self._storages.clear()
        self._memo.clear()
        self._keep.clear()

    def release(self) -> None:
        """The write is over: the buffers go back to the pool (the copies must not be used any more)."""
        self.pool.give_back(self.buffers)
        self.buffers = []
