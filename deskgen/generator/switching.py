"""Switching mixes by fusing them: restore the exact base weights, add the new mix in a few batched ops.

peft's own merge (``pipe.fuse_lora``) walks every LoRA layer of every adapter in Python: per layer and
adapter ``B @ A``, a scale, an in-place add, bookkeeping — thousands of small kernels for SDXL, on every
switch. :class:`BatchedFuser` does the same arithmetic, grouped:

- when an adapter is loaded, its LoRA layers are listed once per (weight shape, rank, dtype, device)
  with ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA) per layer (:func:`collect_factors`): the low-rank
  factors are peft's own tensors (no copy), the layer lists and scales are cached (:class:`AdapterFactors`);
  with :class:`~deskgen.generator.adapters.FusedAdapters` the peft layers are then removed and only
  these tensors remain;
- a mix ``{adapter: w}`` is fused as ``W += sum_k (w_k * alpha_k / r_k * B_k) @ A_k`` per layer: for
  each weight shape, the factors of every adapter are stacked (layers an adapter lacks get zero rows,
  which add exact zeros) and concatenated along the rank, so ONE ``torch.bmm`` computes the summed
  delta of all adapters for all layers of that shape and ONE ``torch._foreach_add_`` adds them to the
  weights (per chunk of at most :data:`CHUNK_ELEMENTS` output elements, which caps the temporaries);
- the base values are put back exactly before the next mix is fused, so a fused mix is always
  ``base + delta``: switching A -> B -> A gives A's weights bit for bit, and the base mix the exact
  base weights. ``fuse_backup: residual`` (CUDA's default) recomputes each chunk's delta, subtracts it
  and applies the chunk's residual saved by the fuse (:mod:`deskgen.generator.residual`: ~2.8 bits a
  weight instead of a copy's 16), falling back to the exact copy for any chunk whose checksum fails;
  ``cpu`` / ``device`` copy every value back from :class:`~deskgen.generator.fusing.PristineWeights`
  with one ``torch._foreach_copy_``;
- while a mix is fused the pipeline's LoRA layers, if it has any (peft adapters beside a fused hot mix),
  are disabled (the base mix's LoRA state), so no branch is applied on top of the fused weights (no
  double counting).

Linear layers and convolutions (1x1 and k x k, 1-3 d: ``A`` flattened to ``(r, in*k*k)``, ``B`` to
``(out, r)``: the same sums peft's conv delta computes) are batched. Any other LoRA layer (Embedding,
``fan_in_fan_out``) takes peft's own ``get_delta_weight`` per layer (at mix weight 1, kept), added in the same
``_foreach_add_`` (peft knows those layouts; none occurs in the SDXL LoRAs we load). Refused, as the
adapter's load error (422): DoRA and LoRA-bias layers (they change more than the weight; the registry
refuses DoRA files first) and grouped convolutions (peft cannot merge those either).

The result differs from ``fuse_lora``'s only by float rounding (another summation order and one
rounding of the whole sum instead of one per adapter): ``tests/unit/test_fused_switch.py`` bounds it.

:class:`MixSwitcher` is what :class:`~deskgen.generator.core.DeskGenerator` holds: the fused state, the
exact copies, and the method — ``batched`` (peft adapters) or ``diffusers`` (``pipe.fuse_lora``: hot-swap
slots, whose fused hot mix stays the diffusers way, and the reference the bench and tests compare with).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deskgen.generator import residual
from deskgen.generator.adapters import LORA_COMPONENTS, LoraStrategy, layers_with
from deskgen.generator.fusing import FUSE_METHODS, Fused, PristineWeights
from deskgen.mixes import Mix

log = logging.getLogger(__name__)

#: Most output elements one batched matmul writes at once (a transient buffer): 2**25 = 128 MiB in fp32.
CHUNK_ELEMENTS = 1 << 25


@dataclass
class FactorGroup:
    """The LoRA layers of one adapter whose base weights share shape, rank, dtype and device."""

    shape: tuple[int, ...]
    rank: int
    a: list[Any] = field(default_factory=list)  # lora_A weights per layer (peft's tensors, not copies)
    b: list[Any] = field(default_factory=list)  # lora_B weights per layer
    params: list[Any] = field(default_factory=list)  # their base weights, in the same order
    alphas: list[float] = field(default_factory=list)  # lora_alpha per layer
    divisors: list[float] = field(default_factory=list)  # r (sqrt(r) for rsLoRA) per layer
    #: Offloaded (:meth:`offload`): ``a`` and ``b`` stacked per layer, ``(rows, r, in*k*k)`` and
    #: ``(rows, out, r)``, in pinned host memory; ``a`` and ``b`` are then empty.
    a_host: Any = None
    b_host: Any = None

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    def offload(self) -> None:
        """Move the factors to host memory, stacked (pinned when they were on a GPU: no GPU memory while no
        fuse needs them, and an asynchronous copy back when one does)."""
        import torch

        if self.a_host is not None or not self.a:
            return
        pin = self.a[0].device.type == "cuda"
        a = torch.stack([t.reshape(self.rank, self.fan_in) for t in self.a])
        b = torch.stack([t.reshape(self.shape[0], self.rank) for t in self.b])
        self.a_host = torch.empty(a.shape, dtype=a.dtype, pin_memory=pin).copy_(a)
        self.b_host = torch.empty(b.shape, dtype=b.dtype, pin_memory=pin).copy_(b)
        self.a, self.b = [], []

    def stacked(self, compute: Any, device: Any) -> tuple[Any, Any]:
        """``(A, B)`` stacked per layer on ``device`` in ``compute`` dtype (from the host if offloaded)."""
        import torch

        if self.a_host is not None:
            a = self.a_host.to(device, non_blocking=True)
            b = self.b_host.to(device, non_blocking=True)
        else:
            a = torch.stack([t.reshape(self.rank, self.fan_in) for t in self.a])
            b = torch.stack([t.reshape(self.shape[0], self.rank) for t in self.b])
        return a.to(compute), b.to(compute)

    @property
    def nbytes(self) -> tuple[int, int]:
        """Bytes of the factors (on their device, in pinned host memory)."""
        device = sum(t.numel() * t.element_size() for t in (*self.a, *self.b))
        host = sum(t.numel() * t.element_size() for t in (self.a_host, self.b_host) if t is not None)
        return device, host


@dataclass
class AdapterFactors:
    """Where one adapter's low-rank factors sit, grouped for batching; ``single``: the layers the batched
    maths does not cover, as ``(base weight, peft's delta at mix weight 1)``."""

    groups: dict[tuple[Any, ...], FactorGroup] = field(default_factory=dict)
    single: list[tuple[Any, Any]] = field(default_factory=list)

    @property
    def params(self) -> list[Any]:
        return [p for group in self.groups.values() for p in group.params] + [p for p, _ in self.single]

    @property
    def layers(self) -> int:
        """How many layers the adapter adapts."""
        return len(self.params)


def collect_factors(pipe: Any, peft: str) -> AdapterFactors:
    """List the LoRA layers of adapter ``peft`` (loaded the peft way into ``pipe``'s LoRA components),
    grouped for batching. The factors are peft's own tensors (detached, no copy), so they outlive the
    layers (:class:`~deskgen.generator.adapters.FusedAdapters` removes them). Raises RuntimeError for a
    layer the fuse would get wrong (DoRA, LoRA bias, grouped convolutions)."""
    found = AdapterFactors()
    for component in LORA_COMPONENTS:
        for layer in layers_with(pipe, component, [peft]):
            refusal = _refusal(layer, peft)
            if refusal is not None:
                raise RuntimeError(f"adapter {peft!r} cannot be fused: {refusal}")
            weight = layer.get_base_layer().weight
            rank = int(layer.r[peft])
            divisor = math.sqrt(rank) if layer.use_rslora.get(peft, False) else float(rank)
            alpha = float(layer.lora_alpha[peft])
            if batching_problem(layer, peft) is not None:
                found.single.append((weight, _peft_delta(layer, peft, alpha / divisor).detach()))
                continue
            key = (tuple(weight.shape), rank, weight.dtype, weight.device)
            group = found.groups.setdefault(key, FactorGroup(tuple(weight.shape), rank))
            group.a.append(layer.lora_A[peft].weight.detach())
            group.b.append(layer.lora_B[peft].weight.detach())
            group.params.append(weight)
            group.alphas.append(alpha)
            group.divisors.append(divisor)
    return found


def batching_problem(layer: Any, peft: str) -> str | None:
    """Why ``layer``'s ``peft`` adapter cannot be fused by the batched matmul (None if it can)."""
    import torch
    from peft.tuners.lora import layer as lora

    base = layer.get_base_layer()
    if isinstance(layer, lora.Linear) and isinstance(base, torch.nn.Linear):
        return "fan_in_fan_out" if layer.fan_in_fan_out else None
    if isinstance(layer, (lora.Conv1d, lora.Conv2d, lora.Conv3d)) and isinstance(base, torch.nn.modules.conv._ConvNd):
        return None  # groups == 1 (refused otherwise): the delta is B (out, r) @ A (r, in*k...)
    return f"a {type(base).__name__} layer"


def _refusal(layer: Any, peft: str) -> str | None:
    if getattr(layer.get_base_layer(), "groups", 1) != 1:
        return "a grouped convolution (peft cannot merge LoRA into it either)"
    if peft in getattr(layer, "lora_variant", {}):
        return f"a {type(layer.lora_variant[peft]).__name__} layer (DoRA changes more than the weight)"
    if getattr(layer, "lora_bias", {}).get(peft, False):
        return "a LoRA with a bias (lora_bias) changes the base bias too"
    return None


class BatchedFuser:
    """The factor cache per adapter and the batched fuse (module docstring)."""

    def __init__(self, pipe: Any, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.pipe = pipe
        self.chunk_elements = chunk_elements
        self.factors: dict[str, AdapterFactors] = {}
        #: Pinned host buffers for the residuals of weights on a GPU.
        self.pool = residual.HostPool()
        #: Encodes and decodes residuals (compiled where the UNet is: :class:`~deskgen.generator.residual.Codec`).
        self.codec = residual.EAGER
        #: Bytes of the largest set of temporaries the last fuse held at once (stacked factors + one chunk).
        self.transient_bytes = 0

    def add(self, peft: str, factors: AdapterFactors | None = None, *, offload: bool = False) -> AdapterFactors:
        """Cache ``peft``'s factors: ``factors`` as given, or listed from the pipeline's peft layers
        (:func:`collect_factors`; RuntimeError for a layer kind the fuse would get wrong). ``offload``:
        keep them in host memory (:meth:`FactorGroup.offload`; only for factors nothing else holds)."""
        found = collect_factors(self.pipe, peft) if factors is None else factors
        if offload:
            for group in found.groups.values():
                group.offload()
        self.factors[peft] = found
        return found

    def factor_bytes(self) -> tuple[int, int]:
        """Bytes of every cached adapter's batched factors: (on their device, in host memory)."""
        sizes = [group.nbytes for found in self.factors.values() for group in found.groups.values()]
        return sum(d for d, _ in sizes), sum(h for _, h in sizes)

    def drop(self, peft: str) -> None:
        self.factors.pop(peft, None)

    def params(self, weights: list[tuple[str, float]]) -> list[Any]:
        """The base weights a mix (peft name, weight) writes, each once, in a fixed order."""
        seen: dict[int, Any] = {}
        for peft, _ in weights:
            for param in self.factors[peft].params:
                seen.setdefault(id(param), param)
        return list(seen.values())

    def fuse(self, weights: list[tuple[str, float]], residuals: dict[int, Any] | None = None) -> None:
        """Add ``sum_k w_k * alpha/r * B_k @ A_k`` to every weight the adapters ``weights`` (peft name,
        weight; all cached by :meth:`add`) adapt. The weights must hold their base values.

        With ``residuals`` (a dict, filled here), each batched chunk's residual (:mod:`deskgen.generator.
        residual`) is stored under its chunk number, for :meth:`unfuse`; kept on the host (in ``pool``'s
        pinned buffers when given and the weights are on a GPU)."""
        import torch

        single = self._single(weights)
        with torch.no_grad():
            if single:
                torch._foreach_add_([t for t, _ in single], [d for _, d in single])
            self.transient_bytes = sum(d.numel() * d.element_size() for _, d in single)
            for number, (chunk, delta) in enumerate(self._chunks(weights)):
                targets = [p.detach() for p in chunk]
                if residuals is None:
                    torch._foreach_add_(targets, list(delta.unbind(0)))
                    continue
                base = torch.stack(targets)
                fused = base + delta
                torch._foreach_copy_(targets, list(fused.unbind(0)))
                found = self.codec.encode(base, fused, delta)
                if found.packed.device.type != "cpu":
                    found = found.into(self.pool, number)
                residuals[number] = (tuple(id(p) for p in chunk), found)

    def unfuse(self, weights: list[tuple[str, float]], residuals: dict[int, Any]) -> list[Any]:
        """Put back the base values of the weights :meth:`fuse` (with ``residuals``) fused ``weights`` into:
        the delta recomputed, subtracted, and each chunk's residual applied. Returns the weights it could not
        restore exactly (layers outside the batched maths, a chunk without its residual, or one whose
        checksum failed): the caller restores those from its exact copy."""
        import torch

        left: list[Any] = [p for p, _ in self._single(weights)]
        checks: list[tuple[list[Any], Any]] = []
        with torch.no_grad():
            for number, (chunk, delta) in enumerate(self._chunks(weights)):
                ids, found = residuals.get(number, ((), None))
                if found is None or ids != tuple(id(p) for p in chunk):
                    left += chunk
                    continue
                targets = [p.detach() for p in chunk]
                base, ok = self.codec.decode(found, torch.stack(targets), delta)
                torch._foreach_copy_(targets, list(base.unbind(0)))
                checks.append((chunk, ok))
            if checks:  # one synchronisation for every chunk's checksum
                oks = torch.stack([ok for _, ok in checks]).cpu().tolist()
                left += [p for (chunk, _), ok in zip(checks, oks, strict=True) if not ok for p in chunk]
        return left

    def _single(self, weights: list[tuple[str, float]]) -> list[tuple[Any, Any]]:
        """Layers outside the batched maths: (weight, peft's delta summed over the mix) each, summed per
        weight first (a foreach kernel must not see one tensor twice: on CUDA its chunks run in parallel)."""
        single: dict[int, tuple[Any, Any]] = {}
        for peft, weight in weights:
            for param, unit in self.factors[peft].single:
                delta = (unit * weight).to(param.dtype)
                if id(param) in single:
                    delta = single[id(param)][1] + delta
                single[id(param)] = (param.detach(), delta)
        return list(single.values())

    def _chunks(self, weights: list[tuple[str, float]]) -> Iterator[tuple[list[Any], Any]]:
        """The batched part of a mix's delta, chunk by chunk, always in the same order for the same mix and
        factors: ``(weights, delta)`` with the weights of one shape and their deltas stacked ``(n, *shape)``
        in their dtype. One chunk's temporaries live at a time (capped by ``chunk_elements``)."""
        import torch

        # weight shape, dtype, device -> the layers' rows (by param id), and (adapter, group, weight) entries
        shapes: dict[tuple[Any, ...], tuple[dict[int, Any], list[tuple[str, FactorGroup, float]]]] = {}
        for peft, weight in weights:
            for (shape, _, dtype, device), group in self.factors[peft].groups.items():
                rows, entries = shapes.setdefault((shape, dtype, device), ({}, []))
                for param in group.params:
                    rows.setdefault(id(param), param)
                entries.append((peft, group, weight))
        with torch.no_grad():
            for (shape, dtype, device), (rows, entries) in shapes.items():
                params = list(rows.values())
                index = {pid: i for i, pid in enumerate(rows)}
                a_cat, b_cat = self._stack(entries, index, len(params), shape, dtype, device)
                step = max(1, self.chunk_elements // math.prod(shape))
                for start in range(0, len(params), step):
                    product = torch.bmm(b_cat[start : start + step], a_cat[start : start + step])
                    delta = product.to(dtype)
                    chunk = params[start : start + step]
                    held = {id(t): t for t in (a_cat, b_cat, product, delta)}.values()
                    self.transient_bytes = max(self.transient_bytes, sum(t.numel() * t.element_size() for t in held))
                    yield chunk, delta.view(len(chunk), *shape)
                    del product, delta

    @staticmethod
    def _stack(
        entries: list[tuple[str, FactorGroup, float]], index: dict[int, int], count: int,
        shape: tuple[int, ...], dtype: Any, device: Any,
    ) -> tuple[Any, Any]:  # fmt: skip
        """``(A, B)`` of every entry, stacked per layer row and concatenated along the rank:
        ``A`` (rows, R, in*k*k), ``B`` scaled by ``w * alpha / r`` (rows, out, R)."""
        import torch

        # As peft: CPU half-precision deltas in float32 (slow half matmuls on CPUs), else in the factors'
        # dtype (float32 factors on a bf16 model stay float32); the delta is rounded to the weight's dtype.
        half_on_cpu = torch.device(device).type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        first = entries[0][1]
        factors = first.b_host.dtype if first.b_host is not None else first.b[0].dtype
        compute = torch.float32 if half_on_cpu else torch.promote_types(dtype, factors)
        out, fan_in = shape[0], math.prod(shape[1:])
        a_parts, b_parts = [], []
        for _, group, weight in entries:
            rank = group.rank
            a, b = group.stacked(compute, device)
            # Like peft's set_scale: (weight * alpha) / r, in double, once per layer.
            scale = [weight * alpha / divisor for alpha, divisor in zip(group.alphas, group.divisors, strict=True)]
            b = b * torch.tensor(scale, dtype=compute).to(device).view(-1, 1, 1)
            rows = [index[id(p)] for p in group.params]
            if rows != list(range(count)):  # the adapter lacks some layers of this shape: zero rows
                a = a.new_zeros((count, rank, fan_in)).index_copy_(0, torch.tensor(rows, device=a.device), a)
                b = b.new_zeros((count, out, rank)).index_copy_(0, torch.tensor(rows, device=b.device), b)
            a_parts.append(a)
            b_parts.append(b)
        return torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=2)


def _peft_delta(layer: Any, peft: str, scale: float) -> Any:
    """peft's own delta of one layer at ``scale`` (its scaling restored afterwards)."""
    before = layer.scaling[peft]
    layer.scaling[peft] = scale
    try:
        return layer.get_delta_weight(peft)
    finally:
        layer.scaling[peft] = before


class MixSwitcher:
    """The fused state of one pipeline: which mix is fused, how, and the exact base copies.

    ``method`` is ``batched`` (:class:`BatchedFuser`) or ``diffusers`` (``pipe.fuse_lora``; what hot-swap
    slots use). Not thread-safe: the generator calls it under its lock.
    """

    def __init__(self, pipe: Any, adapters: LoraStrategy, *, backup: str, method: str,
                 factors_on: str = "device") -> None:  # fmt: skip
        if method not in FUSE_METHODS:
            raise ValueError(f"fuse method must be one of {FUSE_METHODS} but is {method!r}")
        self.pipe = pipe
        self.adapters = adapters
        self.method = method
        #: ``host``: the factors of a strategy that hands them over (FusedAdapters) live in host memory.
        self.factors_on = factors_on
        #: By residual (batched fuses only; the diffusers method restores from pinned copies).
        self.by_residual = backup == "residual" and method == "batched"
        # With residuals the exact copy is the fallback only: plain (unpinned) host memory.
        self.pristine = PristineWeights("cpu" if backup == "residual" else backup, pin=not self.by_residual)
        self.batched = BatchedFuser(pipe)
        self.fused: Fused | None = None
        #: The fused mix's residuals by chunk number (:meth:`BatchedFuser.fuse`).
        self.residuals: dict[int, Any] = {}
        #: Base tensors put back since load: by residual, and from the exact copy (layers outside the batched
        #: maths, and any chunk whose residual checksum failed).
        self.restored = {"residual": 0, "copy": 0}
        #: Host seconds of the last unfuse and fuse (on a GPU the residual path synchronises in both).
        self.last_s = {"unfuse": 0.0, "fuse": 0.0}
        self._lora_layers: list[Any] | None = None  # every LoRA layer of the pipeline (None: list again)

    def loaded(self, peft: str, *, cache: bool = True) -> None:
        """An adapter was loaded: a strategy that keeps the factors itself (:class:`FusedAdapters
        <deskgen.generator.adapters.FusedAdapters>`) hands them over; otherwise, with ``cache`` (and the
        batched method) they are listed now (RuntimeError if it cannot be fused), without on its first fuse."""
        self._lora_layers = None
        held = getattr(self.adapters, "factors", {}).get(peft)
        if held is not None:
            self.batched.add(peft, held, offload=self.factors_on == "host")
        elif cache and self.method == "batched":
            self.batched.add(peft)

    def deleted(self, peft: str) -> None:
        self._lora_layers = None
        self.batched.drop(peft)

    def branches_off(self) -> None:
        """Switch every LoRA branch off (the base mix's LoRA state with peft adapters)."""
        # What pipe.disable_lora() does (enable_adapters(False) on every LoRA layer), but only where a layer
        # is on: disable_lora walks every module of every component, ~40 ms a switch on the tiny SDXL alone.
        if self._lora_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [
                module for component in LORA_COMPONENTS if getattr(self.pipe, component, None) is not None
                for module in getattr(self.pipe, component).modules() if isinstance(module, BaseTunerLayer)
            ]  # fmt: skip
        for layer in self._lora_layers:
            if not layer.disable_adapters:
                layer.enable_adapters(False)

    def fuse(self, mix: Mix, loaded: dict[str, str]) -> None:
        """Make ``mix`` (its adapters loaded, the weights at their base values) the pipeline's state, fused."""
        start = time.perf_counter()
        if self.method == "batched":
            weights = [(loaded[name], weight) for name, weight in mix.weights]
            for peft, _ in weights:
                if peft not in self.batched.factors:
                    self.batched.add(peft)
            params = self.batched.params(weights)
            self.pristine.save(params)
            self.branches_off()  # the base mix's LoRA state: the weights carry the mix
            # Recorded before the weights change: a fuse that fails half-way is still restored by unfuse()
            # (a chunk without its residual comes back from the copy).
            self.fused = Fused(mix, [], params, method="batched", weights=weights)
            self.residuals = {}
            self.batched.fuse(weights, self.residuals if self.by_residual else None)
        else:
            self.adapters.apply(mix, loaded)
            names = self.adapters.peft_names(mix, loaded)
            components: list[str] = []
            params = []
            for component, peft_names in names.items():
                layers = layers_with(self.pipe, component, peft_names)
                if layers:
                    components.append(component)
                    params += [p for layer in layers for p in layer.get_base_layer().parameters(recurse=False)]
            self.pristine.save(params)
            self.fused = Fused(mix, components, params, method="diffusers")
            for component in components:
                self.pipe.fuse_lora(components=[component], adapter_names=names[component])
        self.last_s["fuse"] = time.perf_counter() - start
        log.info("fused %s (%s) into %d base tensors in %.3f s", mix.id, self.method, len(params),
                 self.last_s["fuse"])  # fmt: skip

    def unfuse(self) -> None:
        """Restore the exact base weights of whatever is fused (nothing to do if nothing is)."""
        fused = self.fused
        if fused is None:
            return
        start = time.perf_counter()
        if fused.method == "diffusers":
            # unfuse_lora keeps diffusers' and peft's bookkeeping right (merged flags); its subtraction is
            # then overwritten by the exact base values.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already unmerged")
                self.pipe.unfuse_lora(components=fused.components)
        left = fused.params
        if self.by_residual and fused.method == "batched" and all(p in self.batched.factors for p, _ in fused.weights):
            left = self.batched.unfuse(fused.weights, self.residuals)
            self.restored["residual"] += len(fused.params) - len(left)
        self.restored["copy"] += len(left)
        self.pristine.restore(left)
        self.residuals = {}
        self.fused = None
        self.last_s["unfuse"] = time.perf_counter() - start

    def residual_bytes(self) -> int:
        """Bytes of the fused mix's residuals."""
        return sum(found.nbytes for _, found in self.residuals.values())
