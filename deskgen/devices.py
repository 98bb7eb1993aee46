"""Where a transformers model of a fractional-GPU stage (captioner, locator) runs: device and dtype, checked
before the expensive load. The generator has its own richer settings (deskgen.generator.settings)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deskgen.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float16", "bfloat16")


def is_cuda(device: str | None) -> bool:
    """Whether ``device`` (``cuda``, ``cuda:1``, ``cpu``, ...) names a CUDA device: the one test of it."""
    return device is not None and str(device).startswith("cuda")


def placement(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """``(device, torch dtype)``. Defaults: ``cuda`` + ``float16`` where a GPU is available (half the memory,
    tensor cores), ``cpu`` + ``float32`` otherwise (fp16 kernels are slow or missing on CPUs).
    :class:`InvalidParameter` for an unknown dtype or a CUDA device on a machine without one."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_cuda(device) and not torch.cuda.is_available():
        raise InvalidParameter(f"`device` is {device!r} but no CUDA device is available.", field="device")
    if dtype is None:
        dtype = "float16" if is_cuda(device) else "float32"
    if dtype not in DTYPES:
        raise InvalidParameter(f"`dtype` must be one of {', '.join(DTYPES)} but is {dtype!r}.", field="dtype")
    return device, {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
