"""How LoRA adapters live in the pipeline: three strategies behind one interface.

:class:`FusedAdapters` — every mix is fused into the base weights, so the pipeline keeps no LoRA layer at
all: each file is read the peft way and only its low-rank factors are kept. The model's modules never
change, so a compiled UNet never recompiles, and any LoRA whose layers exist in the model (any rank, any
layers) loads without a restart. The default (``fuse_active_mix``), compiled or not.

:class:`PeftAdapters` — one peft adapter per LoRA file in the UNet and both text encoders; a mix is
``set_adapters`` with its weights (``fuse_active_mix: false``: mixes as LoRA branches).

:class:`SlotAdapters` — the UNet half of every adapter is hot-swapped into a fixed number of LoRA
slots of one layout (:class:`HotswapSlots`), so a ``torch.compile``'d UNet never recompiles on a mix
switch; the text-encoder half loads the peft way (the text encoders are not compiled).

:class:`DeskGenerator <deskgen.generator.core.DeskGenerator>` holds one :class:`LoraStrategy` and never
asks which: loading, checking, activating, naming the layers a fuse touches and deleting are the
strategy's. ``public`` names are the adapters' file stems; ``peft`` names are what peft/diffusers call
them (:func:`peft_adapter_name`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from deskgen.errors import InvalidParameter
from deskgen.loras import LoraRegistry, quiet_adapter_load, safetensors_header
from deskgen.mixes import Mix

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: The pipeline components that carry LoRA layers.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def peft_adapter_name(name: str) -> str:
    """The adapter name inside peft/diffusers for public adapter ``name``."""
    # A public name like "training" or "to" would collide with attributes of peft's ModuleDicts; a
    # fixed prefix keeps every valid public name (deskgen.mixes.ADAPTER_NAME_RE) safe inside peft.
    return f"style_{name}"


def layers_with(pipe: Any, component: str, peft_names: Iterable[str]) -> list[Any]:
    """The LoRA layers of ``pipe.<component>`` that hold any of ``peft_names``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = getattr(pipe, component, None)
    if model is None:
        return []
    names = set(peft_names)
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and names & set(getattr(m, "lora_A", {}))]


#: A LoRA file as diffusers reads it: ``(state_dict, network_alphas, metadata)`` (:func:`read_adapter`).
AdapterFile = tuple[dict[str, Any], "dict[str, float] | None", "dict[str, Any] | None"]


class LoraStrategy(Protocol):
    """What :class:`DeskGenerator` asks of the way adapters live in its pipeline."""

    #: ``fused``, ``peft`` or ``hotswap`` (reported in the generator's description).
    kind: str

    def load(self, public: str, peft: str, path: Path) -> None:
        """Load one adapter file under ``peft``; raise (leaving nothing injected half-way is the caller's job
        through :meth:`delete`) if the file cannot be loaded or does not fit."""

    def loaded_layers(self, public: str, peft: str) -> int:
        """How many of the model's layers received ``public``'s weights (diffusers only warns on a mismatch)."""

    def fit_problem(self, public: str, adapter: AdapterFile) -> str | None:
        """Why this strategy cannot hold ``adapter`` (a file that maps onto the model), or None."""

    def check_mix(self, mix: Mix) -> None:
        """Raise InvalidParameter if this strategy cannot hold ``mix`` at once."""

    def apply(self, mix: Mix, loaded: dict[str, str]) -> None:
        """Make ``mix`` (its adapters all loaded; ``loaded`` maps public -> peft names) the LoRA state."""

    def peft_names(self, mix: Mix, loaded: dict[str, str]) -> dict[str, list[str]]:
        """component -> the peft adapter names ``mix`` is made of there (what a fuse merges)."""

    def delete(self, public: str, peft: str) -> None:
        """Remove an adapter's layers (idempotent for a half-loaded one)."""


class PeftAdapters:
    """One peft adapter per LoRA in every component; a mix is ``set_adapters`` with its weights."""

    kind = "peft"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._any_loaded = False

    def load(self, public: str, peft: str, path: Path) -> None:
        self._any_loaded = True
        load_adapter(self.pipe, path, peft)

    def loaded_layers(self, public: str, peft: str) -> int:
        return sum(len(layers_with(self.pipe, component, [peft])) for component in LORA_COMPONENTS)

    def fit_problem(self, public: str, adapter: AdapterFile) -> str | None:
        return None

    def check_mix(self, mix: Mix) -> None:
        return None

    def apply(self, mix: Mix, loaded: dict[str, str]) -> None:
        if not mix.weights:
            if loaded:
                self.pipe.disable_lora()
            return
        # set_adapters does not undo disable_lora (peft keeps a separate "disabled" flag).
        self.pipe.enable_lora()
        self.pipe.set_adapters([loaded[name] for name in mix.adapters], adapter_weights=[w for _, w in mix.weights])

    def peft_names(self, mix: Mix, loaded: dict[str, str]) -> dict[str, list[str]]:
        return {component: [loaded[name] for name in mix.adapters] for component in LORA_COMPONENTS}

    def delete(self, public: str, peft: str) -> None:
        self.pipe.delete_adapters([peft])


class FusedAdapters:
    """Every mix fused: the pipeline holds no LoRA layer, only each adapter's low-rank factors.

    A file is loaded exactly as :class:`PeftAdapters` loads it (:func:`load_adapter`: diffusers' key
    conversion of kohya and diffusers files, peft's rank and alpha rules), its factors are taken out
    (:func:`~deskgen.generator.switching.collect_factors`: peft's tensors, no copy) and the LoRA layers
    are removed again (``unload_lora_weights`` puts each original module back in its place), all under
    the generator's lock. So between requests the model's modules are exactly the base model's: a
    compiled UNet sees the same modules and parameters before and after (its weights change in place
    when a mix is fused, which a compiled graph reads as inputs), and a file added later that adapts
    other layers or has a higher rank loads like any other. Mixes are activated only by fusing
    (:class:`~deskgen.generator.switching.MixSwitcher`, batched).
    """

    kind = "fused"

    def __init__(self, pipe: Any) -> None:
        from deskgen.generator.switching import AdapterFactors

        self.pipe = pipe
        self.factors: dict[str, AdapterFactors] = {}  # peft name -> its factors

    def load(self, public: str, peft: str, path: Path) -> None:
        from deskgen.generator.switching import collect_factors

        # peft freezes every parameter of a model it injects into (requires_grad=False); a compiled graph
        # guards on that flag, so it is put back as it was, with the modules.
        flags = [(p, p.requires_grad) for c in LORA_COMPONENTS if getattr(self.pipe, c, None) is not None
                 for p in getattr(self.pipe, c).parameters()]  # fmt: skip
        try:
            load_adapter(self.pipe, path, peft)
            self.factors[peft] = collect_factors(self.pipe, peft)
        finally:
            with quiet_adapter_load():
                self.pipe.unload_lora_weights()
            for param, flag in flags:
                if param.requires_grad != flag:
                    param.requires_grad_(flag)

    def loaded_layers(self, public: str, peft: str) -> int:
        return self.factors[peft].layers

    def fit_problem(self, public: str, adapter: AdapterFile) -> str | None:
        return None  # any rank, any layer of the model

    def check_mix(self, mix: Mix) -> None:
        return None

    def apply(self, mix: Mix, loaded: dict[str, str]) -> None:
        # The generator fuses every mix; the base mix is the base weights, which it restored already.
        if mix.weights:
            raise RuntimeError(f"mix {mix.id!r}: every mix is fused with FusedAdapters; there are no LoRA layers")

    def peft_names(self, mix: Mix, loaded: dict[str, str]) -> dict[str, list[str]]:
        return {component: [loaded[name] for name in mix.adapters] for component in LORA_COMPONENTS}

    def delete(self, public: str, peft: str) -> None:
        self.factors.pop(peft, None)


@dataclass
class UnetPart:
    """The UNet half of an adapter file, kept ready for hot-swapping (hotswap mode)."""

    state_dict: dict[str, Any]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    modules: list[str]  # UNet modules it adapts (those that exist in this UNet)
    rank: int


def read_lora_file(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The tensors of a LoRA file (on the CPU) and diffusers' adapter metadata from its header
    (``lora_adapter_metadata``: the peft ``LoraConfig`` of files diffusers saved), or None.

    The bytes are read and parsed by ``safetensors.torch.load``, never its memory-mapped ``load_file`` (what
    diffusers' loaders call): with safetensors 0.8 every ``load_file`` leaves about 40 bytes per tensor
    behind for the life of the process (19 KiB per tiny LoRA file, measured; more for real ones), a
    steady creep when a replica loads adapters all day (issue 24, part 6)."""
    from safetensors.torch import load

    data = path.read_bytes()
    raw = (safetensors_header(data).get("__metadata__") or {}).get("lora_adapter_metadata")
    return load(data), (json.loads(raw) if raw else None)


def read_adapter(pipe: Any, path: Path) -> AdapterFile:
    """``(state_dict, network_alphas, metadata)`` of a LoRA file in diffusers' naming (kohya converted),
    UNet keys prefixed ``unet.``, text-encoder keys ``text_encoder.`` / ``text_encoder_2.``: what
    ``load_lora_weights`` reads, from :func:`read_lora_file`."""
    tensors, metadata = read_lora_file(path)
    with quiet_adapter_load():
        state_dict, alphas = pipe.lora_state_dict(tensors, unet_config=pipe.unet.config)
    return state_dict, alphas, metadata


def load_adapter(pipe: Any, path: Path, adapter_name: str) -> None:
    """``pipe.load_lora_weights`` of the file at ``path`` under ``adapter_name`` (UNet and both text
    encoders), reading it with :func:`read_adapter`."""
    state_dict, alphas, metadata = read_adapter(pipe, path)
    with quiet_adapter_load():
        pipe.load_lora_into_unet(state_dict, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name,
                                 metadata=metadata, _pipeline=pipe)  # fmt: skip
        for component in TEXT_ENCODERS:
            pipe.load_lora_into_text_encoder(
                state_dict, network_alphas=alphas, text_encoder=getattr(pipe, component), prefix=component,
                lora_scale=pipe.lora_scale, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe,
            )  # fmt: skip


def peft_state(state_dict: dict[str, Any], component: str) -> dict[str, Any]:
    """``component``'s part of an adapter read by :func:`read_adapter`, prefix removed, in peft naming
    (``<module>.lora_A.weight`` / ``lora_B``): older diffusers names (``to_k_lora.down``) are converted."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    prefix = f"{component}."
    part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if part and not any("lora_A" in k for k in part):
        part = (convert_unet_state_dict_to_peft if component == "unet" else convert_state_dict_to_peft)(part)
    return part


def find_module(model: Any, name: str) -> Any | None:
    """The module ``name`` of ``model``, or None. transformers 5 flattened CLIPTextModel (no
    ``text_model.``) while LoRA files name both encoders' modules ``text_model.…``: both are tried."""
    if model is None:
        return None
    for candidate in (name, name.removeprefix("text_model.")):
        with contextlib.suppress(AttributeError):
            return model.get_submodule(candidate)
    return None


def _lora_modules(part: dict[str, Any]) -> list[str]:
    return [key.removesuffix(".lora_A.weight") for key in part if key.endswith(".lora_A.weight")]


def unet_part(
    pipe: Any, state_dict: dict[str, Any], alphas: dict[str, float] | None, metadata: dict[str, Any] | None
) -> UnetPart:
    """The UNet half of an adapter read by :func:`read_adapter`, with the modules of this UNet it adapts
    and its largest rank."""
    unet_sd = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    peft_sd = peft_state(state_dict, "unet")
    names = _lora_modules(peft_sd)
    modules = sorted(name for name in names if find_module(pipe.unet, name) is not None)
    rank = max((int(peft_sd[f"{name}.lora_A.weight"].shape[0]) for name in names), default=0)
    return UnetPart(unet_sd, alphas, metadata, modules, rank)


def text_encoder_modules(pipe: Any, state_dict: dict[str, Any]) -> tuple[int, int]:
    """``(adapted, existing)``: how many text-encoder modules a state dict read by :func:`read_adapter`
    adapts, and how many of those exist in the pipeline's text encoders."""
    adapted = existing = 0
    for component in TEXT_ENCODERS:
        encoder = getattr(pipe, component, None)
        for name in _lora_modules(peft_state(state_dict, component)):
            adapted += 1
            existing += find_module(encoder, name) is not None
    return adapted, existing


def shape_problem(pipe: Any, state_dict: dict[str, Any]) -> str | None:
    """The first LoRA pair of an adapter whose shapes do not fit the module it adapts (A: rank x inputs,
    B: outputs x rank, the same rank), or None. A file with the right names and the wrong shapes would
    otherwise pass every other check and fail only when a request loads it."""
    for component in ("unet", *TEXT_ENCODERS):
        part = peft_state(state_dict, component)
        model = getattr(pipe, component, None)
        for name in _lora_modules(part):
            module = find_module(model, name)
            b = part.get(f"{name}.lora_B.weight")
            if module is None or b is None:
                continue
            a = part[f"{name}.lora_A.weight"]
            inputs = getattr(module, "in_features", getattr(module, "in_channels", None))
            outputs = getattr(module, "out_features", getattr(module, "out_channels", None))
            if a.ndim < 2 or b.ndim < 2 or a.shape[1] != inputs or b.shape[0] != outputs or b.shape[1] != a.shape[0]:
                return (f"{component} layer {name}: LoRA shapes A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                        f"a layer of {inputs} inputs and {outputs} outputs (A must be rank x {inputs}, B {outputs} x rank)")  # fmt: skip
    return None


def unreadable_problem(exc: Exception) -> str:
    """The reason given for a LoRA file :func:`read_adapter` raised on (diffusers' own verdict: keys it
    cannot rename, a file it cannot read)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"diffusers cannot read it ({type(exc).__name__}: {first[:200]})"


def mapping_problem(pipe: Any, adapter: AdapterFile, expected: int) -> str | None:
    """Why ``adapter`` (a file whose header passed :func:`deskgen.loras.lora_file_problem` and names
    ``expected`` modules, read by :func:`read_adapter`) does not map onto this pipeline, or None. Looks every
    module up, without injecting anything (no peft layer is built)."""
    state_dict, alphas, metadata = adapter
    unet = unet_part(pipe, state_dict, alphas, metadata)
    unet_adapted = sum(1 for k in state_dict if k.startswith("unet.") and k.endswith(("lora_A.weight", "lora.down.weight")))
    _, text_existing = text_encoder_modules(pipe, state_dict)
    matched = len(unet.modules) + text_existing
    if matched != expected or (unet_adapted and not unet.modules):
        return f"only {matched} of its {expected} layers match this model; is it a LoRA for SDXL, and for this base model?"
    return shape_problem(pipe, state_dict)


_FUSED_TAKES_ANY = "fused mixes, the default (`fuse_active_mix`), take any LoRA without a restart"


class HotswapSlots:
    """Hotswap mode: ``count`` LoRA slots of one fixed layout in the UNet; adapters are hot-swapped in.

    Built before compilation: every slot is created with zero weights on the union of the UNet layers
    that the adapters in the LoRA folder adapt, at rank ``rank``, and peft's
    ``prepare_model_for_compiled_hotswap`` turns each layer's scale into a tensor. (diffusers'
    ``enable_lora_hotswap(target_rank=...)`` does the same, but only for the first adapter loaded; we
    need every slot prepared before the compile.) From then on the compiled graph never changes:

    - a switch copies an adapter's A/B weights into a slot, in place (``load_lora_adapter(...,
      hotswap=True)``; layers it does not adapt are zeroed, smaller ranks zero-padded);
    - mix weights are written into the scale tensors in place. NOT ``set_adapters``: it would replace
      the tensors by Python floats (a recompile) and compute the scale from the slot's padded rank;
    - every slot stays active; a slot not in the mix has scale 0, so its branch adds exactly 0.0.

    The slot layout is fixed at load: an adapter added to the folder later that adapts other layers, or
    has a larger rank, does not fit (:meth:`check_fits`); the generator lists it unavailable with that
    reason as soon as it checks the new file (the Generator deployment checks new files in the
    background, before any request names them), and a restart includes it.
    """

    def __init__(self, pipe: Any, parts: dict[str, UnetPart], count: int, rank: int | None) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self.pipe = pipe
        self.names = [f"slot{i}" for i in range(count)]
        self.union = sorted({m for part in parts.values() for m in part.modules})
        self.rank = rank if rank is not None else max((part.rank for part in parts.values()), default=1)
        too_big = sorted(name for name, part in parts.items() if part.rank > self.rank)
        if too_big:
            raise InvalidParameter(
                f"`hotswap_rank` must be at least the rank of every adapter but is {self.rank}; "
                f"{too_big} have rank {max(parts[n].rank for n in too_big)}.",
                field="hotswap_rank",
            )
        unet = pipe.unet
        if self.union:  # (no adapters at all: nothing to lay out, every mix is the base mix)
            for slot in self.names:
                # Fresh tensors per slot: peft may adopt them as the slot's parameters (no copy).
                zeros = self._zero_adapter(unet, self.union, self.rank, dtype=unet.dtype, device=unet.device)
                with quiet_adapter_load():
                    unet.load_lora_adapter(zeros, prefix=None, adapter_name=slot, _pipeline=pipe)
            unet.set_adapters(self.names, [0.0] * count)
            prepare_model_for_compiled_hotswap(unet, target_rank=self.rank, config=unet.peft_config)
        self._layers: dict[str, list[Any]] = {
            slot: [m for m in unet.modules() if isinstance(m, LoraLayer) and slot in m.lora_A] for slot in self.names
        }
        self._unit: dict[str, list[torch.Tensor]] = {slot: self._scales(slot) for slot in self.names}
        self.holds: dict[str, str | None] = dict.fromkeys(self.names)

    @staticmethod
    def _zero_adapter(unet: Any, modules: list[str], rank: int, *, dtype: Any, device: Any) -> dict[str, Any]:
        import torch

        state: dict[str, Any] = {}
        for name in modules:
            module = unet.get_submodule(name)
            if hasattr(module, "get_base_layer"):  # already wrapped by peft (an earlier slot)
                module = module.get_base_layer()
            if isinstance(module, torch.nn.Linear):
                a_shape: tuple[int, ...] = (rank, module.in_features)
                b_shape: tuple[int, ...] = (module.out_features, rank)
            elif isinstance(module, torch.nn.Conv2d):
                a_shape = (rank, module.in_channels // module.groups, *module.kernel_size)
                b_shape = (module.out_channels, rank, 1, 1)
            else:
                raise RuntimeError(f"hotswap mode cannot hot-swap LoRA on {name} ({type(module).__name__})")
            state[f"{name}.lora_A.weight"] = torch.zeros(a_shape, dtype=dtype, device=device)
            state[f"{name}.lora_B.weight"] = torch.zeros(b_shape, dtype=dtype, device=device)
        return state

    def _scales(self, slot: str) -> list[Any]:
        # After a hot-swap each layer's scale tensor holds alpha/rank of the adapter now in the slot.
        return [m.scaling[slot].clone() for m in self._layers[slot]]

    def check_fits(self, name: str, part: UnetPart) -> None:
        """Raise RuntimeError if adapter ``name`` cannot be hot-swapped into these slots."""
        outside = sorted(set(part.modules) - set(self.union))
        if outside:
            raise RuntimeError(
                f"LoRA {name!r} adapts {len(outside)} UNet layers (e.g. {outside[0]}) that the hot-swap LoRA "
                "slots do not have; the slots are laid out from the adapters present at load time: restart "
                f"the replica to include it ({_FUSED_TAKES_ANY})."
            )
        if part.rank > self.rank:
            raise RuntimeError(
                f"LoRA {name!r} has rank {part.rank} but the hot-swap LoRA slots have rank {self.rank} "
                f"(`hotswap_rank`): raise it and restart the replica ({_FUSED_TAKES_ANY})."
            )

    def place(self, mix: Mix, parts: dict[str, UnetPart]) -> dict[str, str]:
        """Put every adapter of ``mix`` in a slot (hot-swapping the missing ones); returns adapter -> slot."""
        placed = {held: slot for slot, held in self.holds.items() if held in mix.adapters}
        # Empty slots first, then slots holding an adapter this mix does not use.
        free = sorted((s for s in self.names if self.holds[s] not in mix.adapters), key=lambda s: self.holds[s] is not None)
        for name in mix.adapters:
            if name in placed:
                continue
            slot = free.pop(0)
            part = parts[name]
            self.holds[slot] = None  # until the swap succeeded
            with quiet_adapter_load():
                self.pipe.unet.load_lora_adapter(
                    part.state_dict, prefix="unet", network_alphas=part.network_alphas, metadata=part.metadata,
                    adapter_name=slot, _pipeline=self.pipe, hotswap=True,
                )  # fmt: skip
            self._unit[slot] = self._scales(slot)
            self.holds[slot] = name
            placed[name] = slot
        return placed

    def set_weights(self, weights: dict[str, float]) -> None:
        """Scale each slot's layers by ``weights[slot]`` (0 for a slot not named), in place."""
        import torch

        for slot in self.names:
            scales = [m.scaling[slot] for m in self._layers[slot]]
            torch._foreach_copy_(scales, torch._foreach_mul(self._unit[slot], weights.get(slot, 0.0)))

    def release(self, name: str) -> None:
        """Forget that ``name`` is in a slot (its weights stay there, at scale 0, until overwritten)."""
        for slot, held in self.holds.items():
            if held == name:
                self.holds[slot] = None



class SlotAdapters:
    """The UNet half of each adapter in :class:`HotswapSlots`; the text-encoder half the peft way.

    The slots are laid out at construction from every adapter in ``registry`` (the union of the layers
    they adapt, at the largest rank unless ``rank`` is given), before any compilation.
    """

    kind = "hotswap"

    def __init__(self, pipe: Any, registry: LoraRegistry, count: int, rank: int | None, device: str,
                 names: list[str] | None = None) -> None:  # fmt: skip
        self.pipe = pipe
        self.device = device
        names = registry.names() if names is None else names
        parts = {name: unet_part(pipe, *read_adapter(pipe, registry.path(name))) for name in names}
        self.slots = HotswapSlots(pipe, parts, count, rank)
        self.parts: dict[str, UnetPart] = {}  # loaded adapters' UNet halves, on the device

    def load(self, public: str, peft: str, path: Path) -> None:
        import torch

        state_dict, alphas, metadata = read_adapter(self.pipe, path)
        part = unet_part(self.pipe, state_dict, alphas, metadata)
        self.slots.check_fits(public, part)
        unet_dtype = self.pipe.unet.dtype
        part.state_dict = {
            k: v.to(device=self.device, dtype=unet_dtype if torch.is_floating_point(v) else v.dtype)
            for k, v in part.state_dict.items()
        }
        for component in TEXT_ENCODERS:
            with quiet_adapter_load():
                self.pipe.load_lora_into_text_encoder(
                    state_dict, network_alphas=alphas, text_encoder=getattr(self.pipe, component), prefix=component,
                    lora_scale=self.pipe.lora_scale, adapter_name=peft, metadata=metadata, _pipeline=self.pipe,
                )  # fmt: skip
        self.parts[public] = part

    def loaded_layers(self, public: str, peft: str) -> int:
        text = sum(len(layers_with(self.pipe, component, [peft])) for component in TEXT_ENCODERS)
        return text + len(self.parts[public].modules)

    def fit_problem(self, public: str, adapter: AdapterFile) -> str | None:
        try:
            self.slots.check_fits(public, unet_part(self.pipe, *adapter))
        except RuntimeError as exc:
            return str(exc)
        return None

    def check_mix(self, mix: Mix) -> None:
        if len(mix.adapters) > len(self.slots.names):
            raise InvalidParameter(
                f"`mix` {mix.id!r} has {len(mix.adapters)} adapters but this generator holds at most "
                f"{len(self.slots.names)} at once (`hotswap_slots`).",
                field="mix",
            )

    def apply(self, mix: Mix, loaded: dict[str, str]) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        placed = self.slots.place(mix, self.parts)
        self.slots.set_weights({placed[name]: weight for name, weight in mix.weights})
        for component in TEXT_ENCODERS:
            encoder = getattr(self.pipe, component)
            present = getattr(encoder, "peft_config", {})
            pairs = [(loaded[n], w) for n, w in mix.weights if loaded[n] in present]
            if pairs:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([n for n, _ in pairs], encoder, [w for _, w in pairs])
            else:
                disable_lora_for_text_encoder(encoder)

    def peft_names(self, mix: Mix, loaded: dict[str, str]) -> dict[str, list[str]]:
        names = [loaded[name] for name in mix.adapters]
        slots = [slot for slot, held in self.slots.holds.items() if held in mix.adapters]
        return {"unet": slots, "text_encoder": names, "text_encoder_2": names}

    def delete(self, public: str, peft: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        for component in TEXT_ENCODERS:
            encoder = getattr(self.pipe, component)
            if peft in getattr(encoder, "peft_config", {}):
                delete_adapter_layers(encoder, peft)
        self.parts.pop(public, None)
        self.slots.release(public)


def build_strategy(pipe: Any, registry: LoraRegistry, *, hotswap: bool, fuse_all: bool, slots: int,
                   rank: int | None, device: str, names: list[str] | None = None) -> Strategy:  # fmt: skip
    """The strategy the settings ask for: hot-swap slots, every mix fused, or peft adapters; ``names``:
    the usable adapters (hot-swap lays its slots out from them; default every file of the registry)."""
    if hotswap:
        return SlotAdapters(pipe, registry, slots, rank, device, names)
    if fuse_all:
        return FusedAdapters(pipe)
    return PeftAdapters(pipe)


#: The strategies a generator can hold.
Strategy = FusedAdapters | PeftAdapters | SlotAdapters
