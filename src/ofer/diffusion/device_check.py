"""A checking mode for the GPU code paths that runs anywhere: ``DeviceCheck(device)``.

Inside ``with DeviceCheck(device):`` every PyTorch call is checked (a ``TorchFunctionMode``
for the Python-level calls, a ``TorchDispatchMode`` for the operators they run) and the first
violation raises ``DeviceCheckError`` naming the call:

- host syncs: reading a value of a tensor on the device back (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``,
  ``bool``/``int``/``float`` of a tensor, so also a Python ``if`` on one), operators whose
  output size depends on values (``nonzero``, masked selection, ``unique``, ...), copies from
  the device to the host, and copies from the host to the device that block (on CUDA a
  blocking copy waits for the queued work, ``torch.tensor(..., device=...)`` included);
- a random draw whose ``torch.Generator`` is on another device than the tensor it fills;
- with ``strict`` (for a step captured as a CUDA graph): any tensor an operator receives or
  returns, or a call creates, on another device than ``device``, e.g. a table made on the
  CPU inside the step, which a graph would bake in as a constant.

On a CPU the device can be ``meta``: a network moved there runs shapes only, and every
tensor made without ``device=`` lands on the CPU, where the check finds it, as it would
find it on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+

aten = torch.ops.aten
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__"}
VALUE_SIZED = {aten.nonzero, aten.nonzero_static, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
               aten.unique_consecutive, aten.argwhere, aten.equal, aten.is_nonzero, aten._local_scalar_dense}
COPIES = {aten._to_copy, aten.copy_}


class DeviceCheckError(AssertionError):
    """A host sync, a foreign-device tensor or a misplaced generator inside a ``DeviceCheck``."""


def _tensors(*trees: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_leaves(trees) if isinstance(leaf, torch.Tensor))


class DeviceCheck:
    """``with DeviceCheck(device, strict=True):`` fails on host syncs, on generators filling
    tensors on other devices and (``strict``) on any tensor away from ``device``; see the module."""

    def __init__(self, device: torch.device | str, strict: bool = True) -> None:
        self.device, self.strict = torch.device(device), strict
        self.modes = (_FunctionCheck(self), _DispatchCheck(self))

    def __enter__(self) -> Self:
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)

    def on_device(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is on the checked device (an index-less device matches any index)."""
        d = self.device
        return t.device.type == d.type and (d.index is None or t.device.index in (None, d.index))

    def holds_device_data(self, *trees: Any) -> bool:
        """Whether a tensor in ``trees`` is on the device or another accelerator: reading it is a
        sync (reading a CPU tensor is not, when the checked device is another)."""
        return any(self.on_device(t) or t.device.type != "cpu" for t in _tensors(*trees))

    def check_placed(self, what: str, *trees: Any) -> None:
        if self.strict:
            for t in _tensors(*trees):
                if not self.on_device(t):
                    raise DeviceCheckError(f"{what}: a tensor {tuple(t.shape)} on {t.device}, not on {self.device}")


class _FunctionCheck(TorchFunctionMode):
    def __init__(self, check: DeviceCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS and self.check.holds_device_data(args):
            raise DeviceCheckError(f"Tensor.{name}() reads a value back to the host (a sync on a GPU)")
        if name in ("tensor", "as_tensor") and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            raise DeviceCheckError(f"torch.{name}(..., device={kwargs['device']}) copies from the host and blocks")
        out = func(*args, **kwargs)
        self.check.check_placed(f"{name}() made", out)
        return out


class _DispatchCheck(TorchDispatchMode):
    def __init__(self, check: DeviceCheck) -> None:
        super().__init__()
        self.check = check

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        value_sized = packet in VALUE_SIZED or (packet is aten.index and any(
            t.dtype == torch.bool for t in _tensors(args[1:])))
        if value_sized and self.check.holds_device_data(args):
            raise DeviceCheckError(f"{func} needs values on the host (a sync on a GPU)")
        out = func(*args, **kwargs)
        inputs, outputs = list(_tensors(args, kwargs)), list(_tensors(out))
        generator = kwargs.get("generator")
        for t in outputs if generator is not None else ():
            if t.device != generator.device:
                raise DeviceCheckError(f"{func}: a generator on {generator.device} fills a tensor on {t.device}")
        if packet in COPIES:
            source = inputs[-1] if packet is aten.copy_ else inputs[0]
            target = outputs[0]
            if source.device.type != "cpu" and target.device.type == "cpu":
                raise DeviceCheckError(f"{func}: a copy from {source.device} to the host (a sync on a GPU)")
            blocking = not (kwargs.get("non_blocking") or (packet is aten.copy_ and len(args) > 2 and args[2]))
            if source.device.type == "cpu" and target.device.type != "cpu" and blocking:
                raise DeviceCheckError(f"{func}: a blocking copy from the host to {target.device} (a sync on a GPU)")
        self.check.check_placed(str(func), inputs, outputs)
        return out
