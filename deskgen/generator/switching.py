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
- the base values are restored from :class:`~deskgen.generator.fusing.PristineWeights` with one
  ``torch._foreach_copy_`` before the next mix is fused, so a fused mix is always ``base + delta``:
  switching A -> B -> A gives A's weights bit for bit, and the base mix the exact base weights;
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
from dataclasses import dataclass, field
from typing import Any

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
        #: Bytes of the largest set of temporaries the last fuse held at once (stacked factors + one chunk).
        self.transient_bytes = 0

    def add(self, peft: str, factors: AdapterFactors | None = None) -> AdapterFactors:
        """Cache ``peft``'s factors: ``factors`` as given, or listed from the pipeline's peft layers
        (:func:`collect_factors`; RuntimeError for a layer kind the fuse would get wrong)."""
        found = collect_factors(self.pipe, peft) if factors is None else factors
        self.factors[peft] = found
        return found

    def drop(self, peft: str) -> None:
        self.factors.pop(peft, None)

    def params(self, weights: list[tuple[str, float]]) -> list[Any]:
        """The base weights a mix (peft name, weight) writes, each once, in a fixed order."""
        seen: dict[int, Any] = {}
        for peft, _ in weights:
            for param in self.factors[peft].params:
                seen.setdefault(id(param), param)
        return list(seen.values())

    def fuse(self, weights: list[tuple[str, float]]) -> None:
        """Add ``sum_k w_k * alpha/r * B_k @ A_k`` to every weight the adapters ``weights`` (peft name,
        weight; all cached by :meth:`add`) adapt. The weights must hold their base values."""
        import torch

        # weight shape, dtype, device -> the layers' rows (by param id), and (adapter, group, weight) entries
        shapes: dict[tuple[Any, ...], tuple[dict[int, Any], list[tuple[str, FactorGroup, float]]]] = {}
        # Layers outside the batched maths: peft's delta, summed per weight first (a foreach kernel must not
        # see one tensor twice: on CUDA its chunks run in parallel).
        single: dict[int, tuple[Any, Any]] = {}
        targets: list[Any] = []
        deltas: list[Any] = []
        with torch.no_grad():
            for peft, weight in weights:
                factors = self.factors[peft]
                for (shape, _, dtype, device), group in factors.groups.items():
                    rows, entries = shapes.setdefault((shape, dtype, device), ({}, []))
                    for param in group.params:
                        rows.setdefault(id(param), param)
                    entries.append((peft, group, weight))
                for param, unit in factors.single:
                    delta = (unit * weight).to(param.dtype)
                    if id(param) in single:
                        delta = single[id(param)][1] + delta
                    single[id(param)] = (param.detach(), delta)
            for target, delta in single.values():
                targets.append(target)
                deltas.append(delta)
            if targets:
                torch._foreach_add_(targets, deltas)
            self.transient_bytes = sum(d.numel() * d.element_size() for d in deltas)
            for (shape, dtype, device), (rows, entries) in shapes.items():
                params = list(rows.values())
                index = {pid: i for i, pid in enumerate(rows)}
                a_cat, b_cat = self._stack(entries, index, len(params), shape, dtype, device)
                step = max(1, self.chunk_elements // math.prod(shape))
                for start in range(0, len(params), step):
                    # One chunk's deltas live at a time: the temporaries are capped by chunk_elements.
                    product = torch.bmm(b_cat[start : start + step], a_cat[start : start + step])
                    delta = product.to(dtype)
                    chunk = [p.detach() for p in params[start : start + step]]
                    torch._foreach_add_(chunk, [d.view(shape) for d in delta.unbind(0)])
                    held = {id(t): t for t in (a_cat, b_cat, product, delta)}.values()
                    self.transient_bytes = max(self.transient_bytes, sum(t.numel() * t.element_size() for t in held))

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
        factors = entries[0][1].b[0].dtype
        compute = torch.float32 if half_on_cpu else torch.promote_types(dtype, factors)
        out, fan_in = shape[0], math.prod(shape[1:])
        a_parts, b_parts = [], []
        for _, group, weight in entries:
            rank = group.rank
            a = torch.stack([t.reshape(rank, fan_in) for t in group.a]).to(compute)
            b = torch.stack([t.reshape(out, rank) for t in group.b]).to(compute)
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

    def __init__(self, pipe: Any, adapters: LoraStrategy, *, backup: str, method: str) -> None:
        if method not in FUSE_METHODS:
            raise ValueError(f"fuse method must be one of {FUSE_METHODS} but is {method!r}")
        self.pipe = pipe
        self.adapters = adapters
        self.method = method
        self.pristine = PristineWeights(backup)
        self.batched = BatchedFuser(pipe)
        self.fused: Fused | None = None
        self._lora_layers: list[Any] | None = None  # every LoRA layer of the pipeline (None: list again)

    def loaded(self, peft: str, *, cache: bool = True) -> None:
        """An adapter was loaded: a strategy that keeps the factors itself (:class:`FusedAdapters
        <deskgen.generator.adapters.FusedAdapters>`) hands them over; otherwise, with ``cache`` (and the
        batched method) they are listed now (RuntimeError if it cannot be fused), without on its first fuse."""
        self._lora_layers = None
        held = getattr(self.adapters, "factors", {}).get(peft)
        if held is not None:
            self.batched.add(peft, held)
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
            # Recorded before the weights change: a fuse that fails half-way is still restored by unfuse().
            self.fused = Fused(mix, [], params, method="batched")
            self.batched.fuse(weights)
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
        log.info("fused %s (%s) into %d base tensors in %.3f s", mix.id, self.method, len(params),
                 time.perf_counter() - start)  # fmt: skip

    def unfuse(self) -> None:
        """Restore the exact base weights of whatever is fused (nothing to do if nothing is)."""
        fused = self.fused
        if fused is None:
            return
        if fused.method == "diffusers":
            # unfuse_lora keeps diffusers' and peft's bookkeeping right (merged flags); its subtraction is
            # then overwritten by the exact base values.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already unmerged")
                self.pipe.unfuse_lora(components=fused.components)
        self.pristine.restore(fused.params)
        self.fused = None
