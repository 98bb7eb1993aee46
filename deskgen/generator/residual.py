"""Recovering the exact base weights from the fused ones: ``W0 = fl(W1 - d) + r``, ``r`` ~2.8 bits a weight.

A fused weight is ``W1 = fl(W0 + d)`` (``d`` the mix's delta, rounded to the weight's dtype). Subtracting
the delta again gives ``E = fl(W1 - d)`` (:func:`estimate`), which is ``W0`` for most elements and one
unit in the last place (ulp) off for most of the rest; only where ``|d|`` dwarfs ``|W0|`` (weights near
zero) is it further off. So instead of copying every base weight back from host memory on a switch
(2.2 GiB for SDXL's attention projections: on the H200 most of a 59-79 ms switch), the switch recomputes
``d``, subtracts it, and applies a **residual** saved when the mix was fused:

- each float is mapped to an integer key that orders floats as numbers (:func:`keys`: adjacent floats
  have adjacent keys, -0.0 and +0.0 included), and ``r = key(W0) - key(E)``;
- ``r`` is stored as a 2-bit code per element (0, +1, -1, or *escape*), four to a byte; an escaped
  element (``|r| > 1``, or a NaN) keeps its exact base bits in a sparse list (int32 index, bits). For
  the full-size SDXL and the bench's rank-32 LoRAs in bfloat16 (``python -m bench.residual``) ~87 % of
  the codes are 0, ~12 % are +-1 and ~1.6 % escape: ~2.8 bits a weight, ~17 % of the copy it replaces;
- a checksum of the base keys (their sum and an index-weighted sum, in wrapping int64 arithmetic) is kept
  with it: :meth:`Codec.decode` reports a mismatch, and the caller restores those weights from its exact
  copy instead. That guards the one assumption of the scheme: ``fl(W1 - d)`` at unfuse time is the one
  encoded at fuse time, i.e. the recomputed delta is bit-identical (same inputs, same kernels, one
  stream: true of cuBLAS on one GPU; a CPU BLAS may vary with memory alignment).

The arithmetic is integer except :func:`estimate`'s one subtraction, which rounds explicitly, so eager
and compiled codecs (:class:`Codec`) give the same bits; the only rounding of the weights is the fuse's
own ``fl(W0 + d)``, as on every other path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Integer view of each float dtype's bits, by element size in bytes.
_INT_VIEW = {2: "int16", 4: "int32"}
#: Code of a residual element: 0 -> 0, 1 -> +1, 2 -> -1, 3 -> escaped (exact bits in the sparse list).
ESCAPE = 3
#: Weights of the second checksum: index & CHECK_MASK (in wrapping int64 arithmetic).
CHECK_MASK = 1023


@dataclass
class Residual:
    """What :func:`decode` needs, besides ``E = fl(W1 - d)``, to give the exact base of one chunk."""

    numel: int
    packed: Any  # uint8, ceil(numel / 4): four 2-bit codes per byte, element i in bits 2*(i % 4)
    escape_index: Any  # int32 (k,): flat indices of the escaped elements
    escape_bits: Any  # int16/int32 (k,): their exact base bits
    checksum: Any  # int64 (2,), on the weights' device (:func:`checksum`)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.escape_index, self.escape_bits))

    @property
    def escaped(self) -> int:
        return int(self.escape_index.numel())

    def into(self, pool: HostPool, slot: Any) -> Residual:
        """The same residual copied, asynchronously, into ``pool``'s pinned buffers for ``slot`` (reused by
        the next residual of that slot: stream-ordered after this one's copies back)."""
        packed, index, bits = (pool.take((slot, i), t).copy_(t, non_blocking=True)
                               for i, t in enumerate((self.packed, self.escape_index, self.escape_bits)))  # fmt: skip
        return Residual(self.numel, packed, index, bits, self.checksum)


class HostPool:
    """Pinned host buffers by slot, grown as needed and reused: pinning memory costs far more than a copy,
    so a switch must not pin afresh. Not thread-safe (the generator switches under its lock)."""

    def __init__(self) -> None:
        self._buffers: dict[Any, Any] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def take(self, slot: Any, like: Any) -> Any:
        """A pinned host tensor of ``like``'s shape and dtype, backed by ``slot``'s buffer."""
        import torch

        need = like.numel() * like.element_size()
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < need:
            size = max(need, 0 if buffer is None else buffer.numel() * 3 // 2, 64)
            buffer = self._buffers[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return buffer[:need].view(like.dtype).view(like.shape)


def _bits_dtype(dtype: Any) -> Any:
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    if size not in _INT_VIEW or not dtype.is_floating_point:
        raise TypeError(f"residuals cover 16- and 32-bit floating point weights, not {dtype}")
    return getattr(torch, _INT_VIEW[size])


def keys(values: Any) -> Any:
    """Integer keys that order the floats ``values`` as numbers (int32 for 16-bit floats, int64 for 32-bit):
    ``bits`` for a non-negative float, ``-1 - magnitude bits`` for a negative one, so that the keys of
    adjacent floats differ by one (-0.0 -> -1, +0.0 -> 0). NaN and inf map like any other bit pattern."""
    import torch

    bits_dtype = _bits_dtype(values.dtype)
    wide = torch.int32 if bits_dtype == torch.int16 else torch.int64
    bits = values.view(bits_dtype).to(wide)
    magnitude_mask = (1 << (8 * values.element_size() - 1)) - 1
    return torch.where(bits >= 0, bits, -1 - (bits & magnitude_mask))


def from_keys(keyed: Any, dtype: Any) -> Any:
    """The floats of ``dtype`` whose :func:`keys` are ``keyed`` (the inverse of :func:`keys`)."""
    import torch

    bits_dtype = _bits_dtype(dtype)
    sign = 1 << (8 * torch.empty((), dtype=dtype).element_size() - 1)
    bits = torch.where(keyed >= 0, keyed, (-1 - keyed) - sign)
    return bits.to(bits_dtype).view(dtype)


def checksum(keyed: Any) -> Any:
    """Two sums of the flat ``keyed`` in wrapping int64, as an int64 tensor (2,) on its device: plain, and
    weighted by ``(index & CHECK_MASK) + 1`` (so swapped or offsetting errors show too). Integer sums
    are exact and order-free: deterministic."""
    import torch

    flat = keyed.reshape(-1)
    weights = (torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype) & CHECK_MASK) + 1
    # 16-bit keys (|k| < 2**15) times weights <= 1024 fit in int32; 32-bit keys are int64 already.
    return torch.stack([flat.sum(dtype=torch.int64), (flat * weights).sum(dtype=torch.int64)])


def estimate(fused: Any, delta: Any) -> Any:
    """``fl(W1 - d)``: the subtraction in float32, rounded once to the weights' dtype (written out, so a
    compiled kernel rounds exactly where eager PyTorch does)."""
    return (fused.float() - delta.float()).to(fused.dtype)


def _encode_core(base: Any, fused: Any, delta: Any) -> tuple[Any, Any, Any]:
    """Flat ``base``, ``fused``, ``delta`` -> (packed codes, which elements escape, checksum of the base keys)."""
    import torch

    base_keys = keys(base)
    guess = estimate(fused, delta)
    diff = base_keys - keys(guess)
    # A NaN's payload may differ between an eager and a fused kernel: NaNs always escape (exact bits kept).
    escape = (diff > 1) | (diff < -1) | torch.isnan(guess) | torch.isnan(base)
    codes = torch.where(escape, ESCAPE, torch.where(diff == 1, 1, torch.where(diff == -1, 2, 0))).to(torch.uint8)
    return _pack(codes), escape, checksum(base_keys)


def _decode_core(fused: Any, delta: Any, packed: Any) -> Any:
    """Flat ``fused``, ``delta`` and the packed codes -> the base (escaped elements still to be set)."""
    recovered = keys(estimate(fused, delta))
    codes = _unpack(packed, recovered.numel())
    recovered = recovered + (codes == 1).to(recovered.dtype) - (codes == 2).to(recovered.dtype)
    return from_keys(recovered, fused.dtype)


def _check(values: Any) -> Any:
    return checksum(keys(values))


class Codec:
    """:func:`encode` and :func:`decode`, their elementwise work eager or compiled (``torch.compile``,
    dynamic shapes: one kernel per function for every chunk size). Eager, each of its ~15 elementwise
    steps is a pass over memory; compiled, they fuse into a few kernels (on this project's 2-core CPU 3x
    faster, ``python -m bench.residual``), which on a GPU is what should make a switch by residual cheaper
    than copying the base back (to be measured there). Both give the same bits: the arithmetic is
    integer, and the one float subtraction (:func:`estimate`) rounds explicitly."""

    def __init__(self, *, compiled: bool = False) -> None:
        self.compiled = compiled
        if compiled:
            import torch

            self._encode = torch.compile(_encode_core, dynamic=True)
            self._decode = torch.compile(_decode_core, dynamic=True)
            self._check = torch.compile(_check, dynamic=True)
        else:
            self._encode, self._decode, self._check = _encode_core, _decode_core, _check

    def _call(self, kind: str, *args: Any) -> Any:
        """The compiled or eager ``kind`` function; a compiled one that fails (a compiler that cannot build
        it on this machine) is replaced by the eager one for good, with a warning: the same bits, slower."""
        try:
            return getattr(self, f"_{kind}")(*args)
        except Exception as error:
            if not self.compiled:
                raise
            log.warning("the compiled residual codec failed (%s: %s); using the eager one", type(error).__name__, error)
            self.compiled = False
            self._encode, self._decode, self._check = _encode_core, _decode_core, _check
            return getattr(self, f"_{kind}")(*args)

    def warm_up(self, dtype: Any, device: Any) -> None:
        """Encode and decode a small tensor, so a compiled codec compiles now, not in the first switch."""
        import torch

        gen = torch.Generator().manual_seed(0)
        base = torch.randn(4096, generator=gen).to(device=device, dtype=dtype)
        delta = (torch.randn(4096, generator=gen) * 0.1).to(device=device, dtype=dtype)
        fused = base + delta
        back, ok = self.decode(self.encode(base, fused, delta), fused, delta)
        if not bool(ok) or not torch.equal(back, base):
            raise RuntimeError("the residual codec did not give the base back on its warm-up tensor")

    def encode(self, base: Any, fused: Any, delta: Any) -> Residual:
        """The residual that recovers ``base`` (``W0``) from ``fused`` (``W1 = fl(W0 + d)``, as stored) and
        ``delta`` (``d``), bit for bit; all of one floating dtype and shape, on one device (the result is
        on that device)."""
        import torch

        if not (base.shape == fused.shape == delta.shape) or not (base.dtype == fused.dtype == delta.dtype):
            raise ValueError(f"base {tuple(base.shape)} {base.dtype}, fused {tuple(fused.shape)} {fused.dtype} and "
                             f"delta {tuple(delta.shape)} {delta.dtype} differ")  # fmt: skip
        flat = base.reshape(-1)
        packed, escape, check = self._call("encode", flat, fused.reshape(-1), delta.reshape(-1))
        escaped = torch.nonzero(escape).reshape(-1)
        bits = flat.view(_bits_dtype(base.dtype))[escaped]
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        return Residual(flat.numel(), packed, escaped.to(index_dtype), bits, check)

    def decode(self, residual: Residual, fused: Any, delta: Any) -> tuple[Any, Any]:
        """``(base, ok)``: the base from ``fused``, ``delta`` and the residual :meth:`encode` gave for them, in
        ``fused``'s shape and dtype, and a boolean tensor on its device, False when the result's checksum
        differs (``fused - delta`` is not what was encoded against; then ``base`` is wrong). ``ok`` stays
        on the device, so a caller decoding many chunks synchronises once."""
        if fused.numel() != residual.numel or fused.shape != delta.shape:
            raise ValueError(f"residual of {residual.numel} elements for fused {tuple(fused.shape)} and "
                             f"delta {tuple(delta.shape)}")  # fmt: skip
        device = fused.device
        values = self._call("decode", fused.reshape(-1), delta.reshape(-1), residual.packed.to(device, non_blocking=True))
        bits = values.view(_bits_dtype(fused.dtype))
        escaped = residual.escape_index.to(device, non_blocking=True).long()
        bits[escaped] = residual.escape_bits.to(device, non_blocking=True)
        ok = (self._call("check", values) == residual.checksum.to(device)).all()
        return values.view(fused.shape), ok


EAGER = Codec()


def encode(base: Any, fused: Any, delta: Any) -> Residual:
    """:meth:`Codec.encode`, eager."""
    return EAGER.encode(base, fused, delta)


def decode(residual: Residual, fused: Any, delta: Any) -> tuple[Any, Any]:
    """:meth:`Codec.decode`, eager."""
    return EAGER.decode(residual, fused, delta)


def _pack(codes: Any) -> Any:
    """Four 2-bit codes (uint8) to a byte, element i in bits 2 * (i % 4); the last byte zero-padded."""
    import torch

    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 4))
    quads = codes.view(-1, 4)
    return quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)


def _unpack(packed: Any, numel: int) -> Any:
    import torch

    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> shifts) & 3).reshape(-1)[:numel]
