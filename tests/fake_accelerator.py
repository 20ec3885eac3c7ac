"""A stand-in accelerator for CPU-only CI: tensors that report device ``meta`` but carry
real CPU data.

dictbench takes other branches on a non-CPU device (torch sorts instead of numpy's,
device-side index building, no ``.numpy()``), and on CUDA any op that combines a device
tensor with a non-scalar CPU tensor raises. No GPU is lent to CI, so without this those
branches would never run before a user's GPU did. Under ``fake_accelerator()``:

- a factory or copy asked for device ``meta`` returns an ``OnDevice`` tensor: a wrapper
  whose every op runs on its CPU data, so data-dependent code (``nonzero``, ``item``,
  sparse kernels) runs and results can be compared with the CPU run's;
- an op mixing an ``OnDevice`` tensor with a plain non-scalar CPU tensor, or a CPU
  random generator used for a device tensor, raises ``DeviceMixError``, as CUDA would;
  what CUDA allows across devices stays allowed (copies, CPU index tensors, 0-dim CPU
  tensors).

It models device placement only: not kernel or dtype coverage, NCCL, or asynchronous
execution; autocast is off on the fake device (torch has no autocast for ``meta``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
FAKE = torch.device("meta")

# What CUDA accepts with a CPU operand: copies between devices, CPU index tensors.
ACROSS_DEVICES_OK = {
    aten._to_copy.default,
    aten.copy_.default,
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
    aten.lift_fresh.default,
    aten.detach.default,
    aten.alias.default,
}

# Sparse results cannot be wrapped; remember which plain sparse tensors stand for device
# tensors (by identity, without keeping them alive).
_SPARSE_ON_DEVICE: dict[int, weakref.ref] = {}


class DeviceMixError(RuntimeError):
    """What CUDA would raise: tensors on two devices in one op."""


class OnDevice(torch.Tensor):
    """A tensor on the fake device; ``elem`` holds its data on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=FAKE,
            requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _run(func, args, kwargs or {})


def on_cpu(t: torch.Tensor) -> torch.Tensor:
    """The CPU data of a fake-device tensor (a plain tensor is returned as it is)."""
    return t.elem if isinstance(t, OnDevice) else t


def _on_device(t: Any) -> bool:
    if isinstance(t, OnDevice):
        return True
    ref = _SPARSE_ON_DEVICE.get(id(t)) if isinstance(t, torch.Tensor) else None
    return ref is not None and ref() is t


def _asks_for_device(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"


def _run(func: Any, args: tuple, kwargs: dict) -> Any:
    leaves, _ = tree_flatten((args, kwargs))
    on_dev = any(_on_device(t) for t in leaves)
    cpu_operands = [
        t for t in leaves if isinstance(t, torch.Tensor) and not _on_device(t) and t.dim() > 0
    ]
    wants_dev = _asks_for_device(kwargs.get("device"))
    gen = kwargs.get("generator")
    if wants_dev and isinstance(gen, torch.Generator) and gen.device.type == "cpu":
        raise DeviceMixError(f"{func}: a CPU random generator used for a device tensor")
    if on_dev and cpu_operands and func not in ACROSS_DEVICES_OK:
        shapes = [tuple(t.shape) for t in cpu_operands]
        raise DeviceMixError(f"{func}: a device tensor with CPU tensor(s) of shape {shapes}")
    kw = dict(kwargs)
    is_copy = func is aten._to_copy.default
    to_cpu = is_copy and kw.get("device") is not None and not wants_dev
    if wants_dev or to_cpu:
        kw["device"] = torch.device("cpu")
    out = func(*tree_map(on_cpu, args), **tree_map(on_cpu, kw))
    if is_copy:
        wrap = (wants_dev or (on_dev and kwargs.get("device") is None)) and not to_cpu
    else:
        wrap = on_dev or wants_dev
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            return args[0]  # in place / out=: the first argument, as it was

    def wrap_one(t: Any) -> Any:
        if not (wrap and isinstance(t, torch.Tensor)):
            return t
        if t.layout != torch.strided:
            _SPARSE_ON_DEVICE[id(t)] = weakref.ref(t)
            return t
        return OnDevice(t)

    return tree_map(wrap_one, out)


class _FakeDeviceMode(TorchDispatchMode):
    """Routes ops on plain tensors too, so ``torch.zeros(..., device='meta')`` and
    ``x.to('meta')`` come back as ``OnDevice`` tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _run(func, args, kwargs or {})


@contextlib.contextmanager
def fake_accelerator() -> Iterator[str]:
    """Run the body with ``meta`` as a fake accelerator; yields the device string."""
    real_enabled, real_autocast = torch.is_autocast_enabled, torch.autocast
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    def enabled(*a: Any) -> bool:
        return False if a and a[0] == "meta" else real_enabled(*a)

    def autocast(device_type: str, *a: Any, **k: Any) -> Any:
        if device_type == "meta":
            return contextlib.nullcontext()
        return real_autocast(device_type, *a, **k)

    def building(real: Any) -> Any:
        # torch.tensor(data, device='meta') builds a data-less meta tensor outside the
        # dispatcher: build it on the CPU and wrap it instead.
        def build(data: Any, *a: Any, device: Any = None, **k: Any) -> Any:
            if _asks_for_device(device):
                if isinstance(data, OnDevice):
                    dtype = k.get("dtype")
                    return data if dtype in (None, data.dtype) else data.to(dtype)
                return OnDevice(real(data, *a, **k))
            return real(data, *a, device=device, **k)

        return build

    torch.is_autocast_enabled, torch.autocast = enabled, autocast  # type: ignore[assignment]
    torch.tensor, torch.as_tensor = building(real_tensor), building(real_as_tensor)  # type: ignore[assignment]
    try:
        with _FakeDeviceMode():
            yield "meta"
    finally:
        torch.is_autocast_enabled, torch.autocast = real_enabled, real_autocast  # type: ignore[assignment]
        torch.tensor, torch.as_tensor = real_tensor, real_as_tensor  # type: ignore[assignment]
        _SPARSE_ON_DEVICE.clear()
