"""Device check (opt-in, env MBL_DEVICE_CHECK=1): the run fails where a tensor that was never moved to the
engine's device reaches a collective or the model, also on the CPU.

On a GPU, NCCL reduces CUDA tensors only and the model's weights are on the GPU, so a batch or a reduction
left on the host breaks the run. On the CPU (gloo) the engine's device *is* the host, and a check of
`tensor.device` alone passes whatever the code does. So this check follows where tensors come from:

- marks: a host tensor is a `HostTensor` (a torch.Tensor subclass). The loaders' outputs (MLMBatcher.batch,
  Task.collate) are marked, and so is every tensor that a factory function (torch.tensor, zeros, ones,
  full, empty, as_tensor, from_numpy, arange, rand, randn, randint, ...) makes in jobs/ code without an
  explicit `device=` (a TorchFunctionMode that looks at the caller's file; torch.from_numpy, which modes do
  not see, through a wrapper). The mark survives every op (the result of an op on a HostTensor is one) and
  is cleared only by `.to(<device>)` (or `.to(other_tensor)`) and `.cuda()`: `.to(dtype)`, `.pin_memory()`
  and `.cpu()` keep it.
- sinks: the collectives of torch.distributed (all_reduce, broadcast, all_gather, ...) and the forward of
  every DeepSpeed engine (deepspeed.initialize is wrapped) and of modules passed to `watch`. A sink raises
  DeviceCheckError on a HostTensor, or on a tensor on another device than the engine's, naming the call
  site and where the tensor was made.

jobs/export.py (ONNX export, on the CPU by design) is exempt. `install` is called by Context at trainer
start; `report()` says how many sink calls were checked (the trainer logs it at the end).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

JOBS_DIR = str(Path(__file__).resolve().parent) + os.sep
EXEMPT = {str(Path(__file__).resolve()), JOBS_DIR + "export.py"}

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye}
COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv")


class DeviceCheckError(RuntimeError):
    """A host tensor (or one on another device) reached a collective or the model."""


class HostTensor(torch.Tensor):
    """A tensor that has not been moved to the engine's device. Every result of an op on it is one too, until
    .to(<device>) or .cuda() gives a plain tensor. `_mbl_origin` says where it (or its first ancestor) was made."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.cuda or (func is torch.Tensor.to and _names_device(args, kwargs)):
            return _plain(out)
        if isinstance(out, HostTensor) and "_mbl_origin" not in out.__dict__:
            out._mbl_origin = next((t.__dict__.get("_mbl_origin", "?") for _, t in _tensors(args, "")
                                    if isinstance(t, HostTensor)), "?")
        return out


def _names_device(args: tuple, kwargs: dict) -> bool:
    """Does this Tensor.to(...) call name a device (a device, a device string or index, or another tensor)?"""
    if kwargs.get("device") is not None:
        return True
    return len(args) > 1 and isinstance(args[1], (torch.device, str, int, torch.Tensor))


def _plain(t):
    if isinstance(t, HostTensor):
        with torch._C.DisableTorchFunctionSubclass():
            return t.as_subclass(torch.Tensor)
    return t


def mark(t, origin: str = "?"):
    """`t` as a HostTensor (the same storage), made at `origin`; anything else unchanged."""
    if not isinstance(t, torch.Tensor) or isinstance(t, HostTensor):
        return t
    with torch._C.DisableTorchFunctionSubclass():
        out = t.as_subclass(HostTensor)
    out._mbl_origin = origin
    return out


# ---- where a call comes from ------------------------------------------------------------------------

_in_jobs: dict[str, bool] = {}


def _is_jobs_file(filename: str) -> bool:
    known = _in_jobs.get(filename)
    if known is None:
        path = os.path.abspath(filename)
        known = _in_jobs[filename] = path.startswith(JOBS_DIR) and path not in EXEMPT
    return known


def _describe(frame) -> str:
    path = os.path.abspath(frame.f_code.co_filename)
    if path.startswith(JOBS_DIR):
        path = "jobs/" + path[len(JOBS_DIR):]
    return f"{path}:{frame.f_lineno} ({frame.f_code.co_name})"


def _jobs_caller(frame) -> str | None:
    """`frame` described, if it runs jobs/ code (the exempt files aside); else None."""
    return _describe(frame) if _is_jobs_file(frame.f_code.co_filename) else None


def call_site() -> str:
    """The innermost jobs/ frame of the current stack; without one, the innermost frame outside torch and
    this module (a test, DeepSpeed)."""
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    frame, fallback = sys._getframe(1), None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != here:
            if path.startswith(JOBS_DIR):
                return _describe(frame)
            if fallback is None and not path.startswith(torch_dir):
                fallback = _describe(frame)
        frame = frame.f_back
    return fallback or "?"


# ---- marks --------------------------------------------------------------------------------------------


class _MarkFactories(TorchFunctionMode):
    """Marks the tensors that factory functions make in jobs/ code without an explicit device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None:
            where = _jobs_caller(sys._getframe(1))
            if where is not None:
                return mark(out, where)
        return out


def _marking_loader(fn, name: str):
    """`fn` whose dict of tensors comes out marked (a loader's output is on the host)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        return {k: mark(v, f"{name} ({k})") for k, v in out.items()}

    return wrapper


# ---- sinks --------------------------------------------------------------------------------------------


def _tensors(value, name: str, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)) and depth < 2:
        for i, v in enumerate(value):
            yield from _tensors(v, f"{name}[{i}]", depth + 1)
    elif isinstance(value, dict) and depth < 2:
        for k, v in value.items():
            yield from _tensors(v, f"{name}[{k!r}]", depth + 1)


def check(what: str, args: tuple, kwargs: dict) -> None:
    """Raise DeviceCheckError if a tensor among args/kwargs is marked or not on the engine's device."""
    expected = _state["device"]
    _state["checked"][what] = _state["checked"].get(what, 0) + 1
    found = [*(t for i, a in enumerate(args) for t in _tensors(a, f"argument {i}")),
             *(t for k, a in kwargs.items() for t in _tensors(a, f"`{k}`"))]
    for name, t in found:
        if isinstance(t, HostTensor):
            problem = f"a host tensor made at {t.__dict__.get('_mbl_origin', '?')}, never moved to the device"
        elif t.device != expected:
            problem = f"a tensor on {t.device}"
        else:
            continue
        raise DeviceCheckError(f"device check: {what} at {call_site()} gets {name}: {problem}; the engine's "
                               f"device is {expected}: move it there first (.to(engine.device), "
                               "jobs.device.to_device, or device= when making it)")


def _checked_collective(fn, name: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        check(f"torch.distributed.{name}", args, kwargs)
        return fn(*args, **kwargs)

    return wrapper


def watch(module, device=None) -> None:
    """Check every forward of `module` (an engine or a model on the device); nothing unless installed."""
    if not _state["installed"]:
        return
    device = torch.device(device) if device is not None else getattr(module, "device", _state["device"])
    if device != _state["device"]:
        raise DeviceCheckError(f"device check: {type(module).__name__} is on {device}, this rank's device is "
                               f"{_state['device']}")
    name = f"forward of {type(module).__name__}"

    def hook(mod, args, kwargs):
        if _state["installed"]:
            check(name, args, kwargs)

    module.register_forward_pre_hook(hook, with_kwargs=True)


# ---- install ------------------------------------------------------------------------------------------

_state: dict = {"installed": False, "device": None, "checked": {}, "undo": [], "mode": None}


def installed() -> bool:
    return _state["installed"]


def _patch(owner, attr: str, value) -> None:
    _state["undo"].append((owner, attr, getattr(owner, attr)))
    setattr(owner, attr, value)


def install(device=None) -> None:
    """Turn the check on in this process for `device` (default: the current CUDA device, else the CPU)."""
    if _state["installed"]:
        return
    import torch.distributed as dist

    from jobs import data, tasks

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    _state.update(installed=True, device=torch.device(device), checked={})
    for name in COLLECTIVES:
        if hasattr(dist, name):
            _patch(dist, name, _checked_collective(getattr(dist, name), name))
    from_numpy = torch.from_numpy

    def marking_from_numpy(array):
        out = from_numpy(array)
        where = _jobs_caller(sys._getframe(1))
        return mark(out, where) if where is not None else out

    _patch(torch, "from_numpy", marking_from_numpy)
    _patch(data.MLMBatcher, "batch", _marking_loader(data.MLMBatcher.batch, "MLMBatcher.batch"))
    _patch(tasks.Task, "collate", _marking_loader(tasks.Task.collate, "Task.collate"))
    try:
        import deepspeed
    except ImportError:  # pragma: no cover - the trainer always has it
        deepspeed = None
    if deepspeed is not None:
        initialize = deepspeed.initialize

        @functools.wraps(initialize)
        def watched_initialize(*args, **kwargs):
            result = initialize(*args, **kwargs)
            watch(result[0])
            return result

        _patch(deepspeed, "initialize", watched_initialize)
    _state["mode"] = _MarkFactories()
    _state["mode"].__enter__()
    if os.environ.get("RANK", "0") == "0":
        print(f"[mbl] device check on (MBL_DEVICE_CHECK=1): host tensors must not reach collectives or the "
              f"model; the device is {_state['device']}", flush=True)


def uninstall() -> None:
    """Undo `install` (for tests that install it in their own process)."""
    if not _state["installed"]:
        return
    _state["mode"].__exit__(None, None, None)
    for owner, attr, value in reversed(_state["undo"]):
        setattr(owner, attr, value)
    _state.update(installed=False, device=None, undo=[], mode=None)


def report() -> str:
    """How many sink calls were checked, by kind."""
    counts = ", ".join(f"{n} {what}" for what, n in sorted(_state["checked"].items()))
    return f"device check: {counts or 'nothing'} checked on this rank, no host tensor among them"
