"""Generator settings: ONE type for what a deployment asks for and what a replica runs.

:class:`GeneratorSettings` is what serve_config.yaml's ``generator_options`` become (through
:func:`settings_from_options`, which also expands a named :data:`SPEED_PROFILES` entry). Fields left
None take the safe default for the device and dtype; :meth:`GeneratorSettings.resolve_for` returns the
same type with every None filled in — what a generator actually runs, and what every image's metadata
carries under ``runtime`` (:meth:`GeneratorSettings.describe`). The module docstring of
:mod:`deskgen.generator` explains each speed flag and the measurements behind the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from deskgen.checks import check_choice as _check_choice
from deskgen.checks import check_flag as _check_flag
from deskgen.checks import check_int as _check_int
from deskgen.devices import is_cuda
from deskgen.errors import InvalidParameter
from deskgen.mixes import BASE_MIX_ID, NAMED_MIXES, Mix, parse_mix_spec

DEFAULT_MODEL_ID = "fluently/Fluently-XL-v2"
DEFAULT_LORA_DIR = "models/tiny/loras"
DTYPES = ("float32", "float16", "bfloat16")
ATTENTIONS = ("sdpa", "eager", "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: ``unet``: one graph of the whole UNet; ``blocks``: each transformer block and resnet compiled on its
#: own (regional compilation: blocks of one shape share one compiled graph, so it compiles in a
#: fraction of the time, and the UNet's own forward stays eager, which DeepCache needs).
COMPILE_SCOPES = ("unet", "blocks")
FUSE_BACKUPS = ("residual", "cpu", "device")
LORA_FACTOR_PLACES = ("host", "device")
#: Named speed profiles: GeneratorSettings fields a deployment selects with ``speed_profile`` in its
#: ``generator_options`` (its own fields override the profile's). ``exact`` is the default; the others
#: trade something measurable (BENCHMARKS.md "GPU suite") for speed or memory.
SPEED_PROFILES: dict[str, dict[str, Any]] = {
    "exact": {},
    # Approximate: every third denoising step full, the others reuse the deep features (0.74 s vs 1.78 s).
    "deepcache": {"deepcache_interval": 3},
    # Low memory: FP8 UNet linears, LoRAs in hot-swap slots (peak 7.1 GiB; slower than a fused mix).
    "fp8": {"fp8": True, "fuse_hot_mix": None},
    "fp8_deepcache": {"fp8": True, "fuse_hot_mix": None, "deepcache_interval": 3},
}
#: Fields that say where the model is, not how it runs (left out of :meth:`GeneratorSettings.describe`).
_LOCATION_FIELDS = ("model_id", "lora_dir")


def hot_mix_from_spec(spec: str, *, field: str = "fuse_hot_mix") -> Mix:
    """The mix ``spec`` names: a name in :data:`deskgen.mixes.NAMED_MIXES` (the built-in catalogue; a
    ``user_config`` catalogue is not visible to a replica's static settings), or ``adapter:weight+...``
    (a canonical mix id is such a spec). Raises InvalidParameter naming ``field`` for anything else."""
    if not isinstance(spec, str):
        raise InvalidParameter(f"`{field}` must be a mix name or `adapter:weight+...` but is {spec!r}.", field=field)
    text = spec.strip()
    if text in NAMED_MIXES:
        return Mix.from_weights(NAMED_MIXES[text], field=field)
    if text == BASE_MIX_ID:
        raise InvalidParameter(f"`{field}`: the base mix has nothing to fuse; leave it null instead of {spec!r}.", field=field)
    if ":" not in text and "+" not in text:
        raise InvalidParameter(
            f"`{field}` must name a built-in mix {sorted(NAMED_MIXES)} or be `adapter:weight+...` but is {spec!r}.",
            field=field,
        )
    mix = Mix.from_weights(parse_mix_spec(text, field=field), field=field)
    if not mix.weights:
        raise InvalidParameter(f"`{field}`: every weight of {spec!r} is 0, so there is nothing to fuse.", field=field)
    return mix


_FUSE_VS_SLOTS = (
    "`fuse_active_mix` needs `hotswap` off: hot-swap slots keep every LoRA branch apart, while fusing writes "
    "the mix into the base weights and keeps no LoRA layer."
)


def _check_compile_combination(compile_: bool, settings: GeneratorSettings) -> None:
    """Raise InvalidParameter for settings that cannot go with ``compile_`` (the effective compile flag)."""
    if compile_ and settings.hotswap is False and settings.fuse_active_mix is False:
        raise InvalidParameter(
            "`compile` needs every mix fused (`fuse_active_mix`) or hot-swap slots (`hotswap`): a compiled UNet "
            "with one peft adapter per LoRA recompiles on every mix switch.",
            field="hotswap",
        )
    if compile_ and settings.deepcache_interval is not None and settings.compile_scope == "unet":
        raise InvalidParameter(
            "`deepcache_interval` needs `compile_scope: blocks` when `compile` is on: DeepCache switches the "
            "UNet's own forward between two paths per step, so only its blocks can be compiled.",
            field="deepcache_interval",
        )


def settings_from_options(options: dict[str, Any]) -> GeneratorSettings:
    """GeneratorSettings from a deployment's options: the fields of ``options["speed_profile"]`` (a name
    in :data:`SPEED_PROFILES`, default ``exact``) overridden by the other keys. An unknown profile or
    field raises InvalidParameter naming it."""
    values = dict(options)
    profile = values.pop("speed_profile", None) or "exact"
    if not isinstance(profile, str) or profile not in SPEED_PROFILES:
        raise InvalidParameter(
            f"`speed_profile` must be one of {sorted(SPEED_PROFILES)} but is {profile!r}.", field="speed_profile"
        )
    known = {f.name for f in dataclasses.fields(GeneratorSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidParameter(
            f"`{unknown[0]}` is not a generator setting; the settings are {sorted(known)} and `speed_profile`.",
            field=unknown[0],
        )
    return GeneratorSettings(**{**SPEED_PROFILES[profile], **values})


@dataclass(frozen=True)
class GeneratorSettings:
    """Settings of a generator; changing any of them means loading a new pipeline.

    ``device`` None picks ``cuda`` when available, else ``cpu``; ``dtype`` None picks ``bfloat16`` on a
    GPU that supports it (``float16`` otherwise) and ``float32`` on the CPU. Relative paths resolve
    against the project root (:func:`deskgen.paths.resolve`). A field left None takes the safe default
    for the resolved device and dtype. Construction validates every field's type and range
    (InvalidParameter naming the field); :meth:`resolve` also checks what depends on the device (CUDA
    present, ``vae_upcast`` vs dtype) and fills every None in.
    """

    model_id: str = DEFAULT_MODEL_ID
    lora_dir: str = DEFAULT_LORA_DIR
    device: str | None = None
    dtype: str | None = None
    #: ``"sdpa"`` | ``"eager"`` | ``"default"``: the attention processor of the UNet and the VAE.
    attention: str = "sdpa"
    #: UNet + VAE in channels_last (NHWC). None: on for CUDA, off on CPU.
    channels_last: bool | None = None
    #: Decode with the VAE in float32. None: on for float16 (SDXL's VAE overflows in fp16), off otherwise;
    #: False with float16 only for a VAE fixed for fp16 (e.g. madebyollin/sdxl-vae-fp16-fix).
    vae_upcast: bool | None = None
    #: Decode in tiles (saves memory at large sizes; changes pixels once the image exceeds the tile).
    vae_tiling: bool = False
    #: Decode a batch one image at a time (saves memory for batches; same pixels).
    vae_slicing: bool = False
    #: The VAE decoder's resnets compute in place where nothing else reads the tensor (a lower memory
    #: peak at 1024 px; same pixels: :mod:`deskgen.generator.lean_vae`).
    vae_inplace: bool = True
    #: Fuse whatever mix is active into the base weights (:mod:`deskgen.generator.switching`): a switch
    #: restores the exact base weights and adds the new mix's summed low-rank deltas in a few batched ops,
    #: so every mix generates at base speed, and the pipeline keeps no LoRA layer (compiled or not; any
    #: LoRA the model can take loads without a restart). None: on exactly when ``hotswap`` is off (FP8
    #: weights cannot hold a delta). False: unfused peft branches, or hot-swap slots with ``compile``
    #: (only ``fuse_hot_mix``, if set, is fused).
    fuse_active_mix: bool | None = None
    #: A mix (built-in name or ``adapter:weight+...``) activated at load, whose adapters stay loaded. With
    #: ``fuse_active_mix`` it is fused like any other mix (so this is only a warm start); without (hot-swap
    #: slots, or ``fuse_active_mix: false``) it is the one mix fused while active, and switching to
    #: another mix restores the base weights exactly.
    fuse_hot_mix: str | None = None
    #: How a switch gets the exact base values of the layers a fuse overwrote back
    #: (:mod:`deskgen.generator.fusing`): ``"residual"`` recomputes the mix's delta, subtracts it and applies
    #: a 2-bit-per-weight correction saved at fuse time (:mod:`deskgen.generator.residual`; a sixth of the
    #: bytes of a copy cross the bus; a plain host copy stays as the fallback); ``"cpu"`` copies them back
    #: from pinned host memory; ``"device"`` from a copy on the GPU (fastest, costs their size in GPU
    #: memory). None: ``residual`` on CUDA when every mix is fused, else ``cpu``.
    fuse_backup: str | None = None
    #: Where each loaded adapter's low-rank factors live between switches when every mix is fused:
    #: ``host`` (pinned memory; a switch copies the two mixes' factors over, ~113 MiB per rank-32 SDXL
    #: adapter) or ``device`` (GPU memory, ~113 MiB per loaded adapter for good). None: ``host`` on CUDA
    #: with ``fuse_active_mix``, else ``device``.
    lora_factors: str | None = None
    #: ``torch.compile`` the UNet. Every mix is fused into its weights (no LoRA layer, no recompile on a
    #: switch), or with ``fuse_active_mix: false`` hot-swapped into fixed slots. None: on for CUDA
    #: (measured 1.2-1.4x on an H200, BENCHMARKS.md), off on the CPU.
    compile: bool | None = None
    #: The ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``, ...).
    compile_mode: str = "default"
    #: What is compiled: ``unet`` (one graph) or ``blocks`` (regional; see :data:`COMPILE_SCOPES`).
    compile_scope: str = "blocks"
    #: Hot-swap the UNet half of adapters into fixed LoRA slots (unfused LoRA branches that a compiled UNet
    #: runs without recompiling; the slots' layout and rank are fixed at load). None: on with ``fp8``, and
    #: with ``compile`` when ``fuse_active_mix`` is false; it may be on without either (to test or measure it).
    hotswap: bool | None = None
    #: Hotswap: how many adapters one mix may hold (each slot costs a LoRA branch per adapted layer).
    hotswap_slots: int = 3
    #: Hotswap: the LoRA rank every slot is padded to. None: the largest rank among the adapters in
    #: ``lora_dir`` at load time.
    hotswap_rank: int | None = None
    #: Compile mode: generate once at this square size at load time, so the replica compiles before it
    #: takes traffic. None: compile on the first request instead.
    compile_warmup_size: int | None = 1024
    #: UNet token linears in FP8 (:mod:`deskgen.fp8`). Implies ``hotswap``; not with a fused mix.
    fp8: bool = False
    #: DeepCache (:mod:`deskgen.deepcache`): every ``deepcache_interval``-th step full, the others reuse
    #: the deep features. Changes the image: a speed profile of its own, None (off) by default; eager only.
    deepcache_interval: int | None = None
    #: The sampler (:data:`deskgen.generator.recipe.SCHEDULERS`: ``euler``, ``euler_a``,
    #: ``dpmpp_2m_karras``, ...); ``default`` keeps the scheduler the model folder ships.
    scheduler: str = "default"
    #: Load ``variant="fp16"`` weights where the model folder has them (``*.fp16.safetensors``) and the
    #: device is CUDA with a 16-bit dtype: half the bytes to read, the same values once cast. False: never.
    fp16_variant: bool = True


    def __post_init__(self) -> None:
        from deskgen.generator.recipe import SCHEDULERS

        _check_choice("scheduler", self.scheduler, tuple(SCHEDULERS))
        _check_flag("fp16_variant", self.fp16_variant)
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_flag("channels_last", self.channels_last, optional=True)
        _check_flag("vae_upcast", self.vae_upcast, optional=True)
        for name in ("vae_tiling", "vae_slicing", "vae_inplace"):
            _check_flag(name, getattr(self, name))
        _check_flag("compile", self.compile, optional=True)
        _check_flag("hotswap", self.hotswap, optional=True)
        _check_flag("fp8", self.fp8)
        if self.fp8 and self.hotswap is False:
            raise InvalidParameter(
                "`hotswap` must be on (or null) when `fp8` is on: peft cannot add adapters to FP8 layers, so "
                "LoRAs go into slots built before the conversion.",
                field="hotswap",
            )
        _check_flag("fuse_active_mix", self.fuse_active_mix, optional=True)
        if self.fp8 and self.fuse_active_mix:
            raise InvalidParameter(
                "`fuse_active_mix` must be off (or null) when `fp8` is on: an FP8 weight cannot hold a fused LoRA "
                "delta exactly.",
                field="fuse_active_mix",
            )
        if self.fuse_active_mix and self.hotswap:
            raise InvalidParameter(_FUSE_VS_SLOTS, field="fuse_active_mix")
        if self.fp8 and self.fuse_hot_mix is not None:
            raise InvalidParameter(
                "`fuse_hot_mix` must be null when `fp8` is on: an FP8 weight cannot hold a fused LoRA delta exactly.",
                field="fuse_hot_mix",
            )
        if self.deepcache_interval is not None:
            from deskgen.deepcache import MAX_INTERVAL

            _check_int("deepcache_interval", self.deepcache_interval, 2, MAX_INTERVAL)
        _check_compile_combination(bool(self.compile), self)
        if self.fuse_backup is not None:
            _check_choice("fuse_backup", self.fuse_backup, FUSE_BACKUPS)
        if self.lora_factors is not None:
            _check_choice("lora_factors", self.lora_factors, LORA_FACTOR_PLACES)
        _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _check_choice("compile_scope", self.compile_scope, COMPILE_SCOPES)
        _check_int("hotswap_slots", self.hotswap_slots, 1, 16)
        if self.hotswap_rank is not None:
            _check_int("hotswap_rank", self.hotswap_rank, 1, 1024)
        if self.compile_warmup_size is not None:
            _check_int("compile_warmup_size", self.compile_warmup_size, 64, 2048)
            if self.compile_warmup_size % 8:
                raise InvalidParameter(
                    f"`compile_warmup_size` must be a multiple of 8 but is {self.compile_warmup_size}.",
                    field="compile_warmup_size",
                )
        if self.fuse_hot_mix is not None:
            hot_mix_from_spec(self.fuse_hot_mix)


    def resolved_device(self) -> str:
        import torch

        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if is_cuda(self.device) and not torch.cuda.is_available():
            raise InvalidParameter(f"`device` is {self.device!r} but no CUDA device is available.", field="device")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        if self.dtype is None:
            if not is_cuda(device):
                return "float32"
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        _check_choice("dtype", self.dtype, DTYPES)
        return self.dtype


    @property
    def is_resolved(self) -> bool:
        """Every device-dependent field filled in (what :meth:`resolve_for` returns)."""
        return None not in (self.device, self.dtype, self.channels_last, self.vae_upcast, self.compile, self.hotswap,
                            self.fuse_active_mix, self.fuse_backup, self.lora_factors)  # fmt: skip

    def resolve(self) -> GeneratorSettings:
        """The effective settings on this machine: every None replaced by its device default.

        Raises InvalidParameter if the device is unavailable, or as :meth:`resolve_for`.
        """
        device = self.resolved_device()
        return self.resolve_for(device, self.resolved_dtype(device))

    def resolve_for(self, device: str, dtype: str) -> GeneratorSettings:
        """The effective settings for ``device`` and ``dtype`` (not checked against this machine: a CPU
        host can tell what a CUDA replica would run). Raises InvalidParameter if ``vae_upcast`` is True
        with a dtype other than float16 (bfloat16 and float32 never overflow in the VAE)."""
        _check_choice("dtype", dtype, DTYPES)
        cuda = is_cuda(device)
        if self.vae_upcast and dtype != "float16":
            raise InvalidParameter(
                f"`vae_upcast` applies to float16 only but is True with dtype {dtype!r}.", field="vae_upcast"
            )
        hot = self.hot_mix()
        compile_ = cuda if self.compile is None else self.compile
        _check_compile_combination(compile_, self)
        # Slots where fused mixes cannot be: FP8 weights, or unfused mixes on a compiled UNet.
        hotswap = (self.fp8 or (compile_ and self.fuse_active_mix is False)) if self.hotswap is None else self.hotswap
        if self.fuse_active_mix and hotswap:
            raise InvalidParameter(_FUSE_VS_SLOTS, field="fuse_active_mix")
        fuse_all = not hotswap if self.fuse_active_mix is None else self.fuse_active_mix
        backup = ("residual" if cuda and fuse_all else "cpu") if self.fuse_backup is None else self.fuse_backup
        return dataclasses.replace(
            self,
            device=device,
            dtype=dtype,
            channels_last=cuda if self.channels_last is None else self.channels_last,
            vae_upcast=(dtype == "float16") if self.vae_upcast is None else self.vae_upcast,
            fuse_hot_mix=hot.id if hot is not None else None,
            compile=compile_,
            hotswap=hotswap,
            fuse_active_mix=fuse_all,
            fuse_backup=backup,
            lora_factors=("host" if cuda and fuse_all else "device") if self.lora_factors is None else self.lora_factors,
        )

    @property
    def compile_residual_codec(self) -> bool:
        """Whether a switch by residual (:class:`MixSwitcher.by_residual
        <deskgen.generator.switching.MixSwitcher>`) runs the residual's elementwise passes as compiled
        kernels: on CUDA, where eager they are a dozen memory-bound passes per weight on the switch's critical
        path, whether or not the UNet is compiled; elsewhere only with ``compile``."""
        if not self.is_resolved:
            raise ValueError("compile_residual_codec is a property of resolved settings (GeneratorSettings.resolve())")
        return bool(self.compile or is_cuda(self.device))

    def hot_mix(self) -> Mix | None:
        """The mix ``fuse_hot_mix`` names (activated at load, its adapters pinned), or None."""
        return hot_mix_from_spec(self.fuse_hot_mix) if self.fuse_hot_mix is not None else None

    def describe(self) -> dict[str, Any]:
        """The effective speed flags by name (JSON-serialisable; for metadata and benchmark tables)."""
        resolved = self if self.is_resolved else self.resolve()
        return {k: v for k, v in dataclasses.asdict(resolved).items() if k not in _LOCATION_FIELDS}
