"""Fusing a mix into the base weights, and restoring those weights exactly.

peft's ``unmerge`` subtracts the delta again, which drifts (``(W + d) - d != W`` in floating point,
worse in fp16, and it accumulates over fuse/unfuse cycles). :class:`PristineWeights` keeps an exact
copy of every base parameter a fuse overwrites and puts it back bit for bit, in batched copies
(``torch._foreach_copy_``): the whole way back with ``fuse_backup: cpu`` or ``device``, and the fallback
of ``residual`` (:mod:`deskgen.generator.residual`, which moves a sixth of the bytes).
:mod:`deskgen.generator.switching` decides what is fused and how.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deskgen.mixes import Mix

#: How a mix was fused: ``batched`` (:class:`deskgen.generator.switching.BatchedFuser`: the LoRA
#: layers disabled, the summed low-rank deltas added to the base weights) or ``diffusers``
#: (``pipe.fuse_lora``: peft's per-layer merge, which marks the layers merged).
FUSE_METHODS = ("batched", "diffusers")


@dataclass
class Fused:
    """A mix fused into the base weights: how, which components, and the base parameters it overwrote."""

    mix: Mix
    components: list[str]
    params: list[Any]
    method: str = "diffusers"
    #: Batched: the (peft name, weight) pairs fused, in the order fused (an unfuse by residual recomputes
    #: the same delta from them).
    weights: list[tuple[str, float]] = field(default_factory=list)


class PristineWeights:
    """Exact copies of the base-layer parameters that fusing overwrites; :meth:`restore` puts them back
    bit for bit, where peft's ``unmerge`` subtracts the delta again and drifts (``(W + d) - d != W`` in
    floating point, worse in fp16, and it accumulates over fuse/unfuse cycles).

    A parameter is copied once for the life of the generator: only a fuse changes base weights, and every
    unfuse restores them, so the first copy stays exact. ``where="cpu"`` keeps the copies in (pinned)
    host memory — no GPU memory, a host-to-device copy per unfuse; ``"device"`` keeps them next to the
    weights — fastest restore, costs their size in GPU memory.
    """

    def __init__(self, where: str, *, pin: bool = True) -> None:
        self.where = where
        #: Host copies of GPU weights in pinned memory (asynchronous restores; pinning costs ~1 s per GiB
        #: once). Off where the copy is only a fallback (``fuse_backup: residual``).
        self.pin = pin
        self._copies: dict[int, tuple[Any, Any]] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def nbytes(self) -> int:
        """Bytes held by the copies."""
        return sum(copy.numel() * copy.element_size() for _, copy in self._copies.values())

    def save(self, params: Iterable[Any]) -> None:
        import torch

        with torch.no_grad():
            for param in params:
                entry = self._copies.get(id(param))
                if entry is not None and entry[0] is param:
                    continue
                if self.where == "device" or param.device.type == "cpu":
                    copy = param.detach().clone()
                else:
                    copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=self.pin)
                    copy.copy_(param.detach())
                # The entry holds the parameter itself, so its id() cannot be reused while the copy lives.
                self._copies[id(param)] = (param, copy)

    def restore(self, params: Iterable[Any]) -> None:
        """Put the saved values back into ``params`` (each saved before): one batched copy where the copies
        sit on the weights' device; from pinned host memory one asynchronous copy per tensor, stream-ordered
        before any later kernel."""
        import torch

        groups: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
        for param in params:
            copy = self._copies[id(param)][1]
            targets, sources = groups.setdefault((str(param.device), str(copy.device)), ([], []))
            targets.append(param.detach())
            sources.append(copy)
        with torch.no_grad():
            for (target_device, source_device), (targets, sources) in groups.items():
                if target_device == source_device:
                    torch._foreach_copy_(targets, sources)
                else:  # host -> device: one asynchronous copy each (foreach kernels need one device)
                    for target, source in zip(targets, sources, strict=True):
                        target.copy_(source, non_blocking=True)
