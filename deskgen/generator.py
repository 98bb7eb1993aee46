"""The generator stage: one SDXL pipeline, style LoRAs mixed onto it, images with their recipe attached.

Ray-free on purpose: ``deployments/generator.py`` wraps :class:`DeskGenerator` and adds multiplexing,
batching and config; unit tests drive this class directly on the tiny models.

    gen = DeskGenerator.from_pretrained(GeneratorSettings(model_id="models/tiny/sdxl"))
    result = gen.generate(GenerationParams(prompt="a desk setup", width=64, height=64, steps=4), mix)
    result.png()  # PNG bytes with the metadata (seed, mix, adapter hashes, ...) in an iTXt chunk

Speed flags (fields of :class:`GeneratorSettings`, set per deployment in serve_config.yaml
``args.generator_options``; :meth:`GeneratorSettings.describe` gives their effective values, which every
image's metadata carries under ``runtime``):

- ``dtype``: bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU; float16 is optional
  (see ``vae_upcast``).
- ``attention`` = ``"sdpa"``: UNet + VAE attention. ``sdpa`` sets diffusers' ``AttnProcessor2_0`` (torch
  scaled_dot_product_attention: flash / memory-efficient kernels on CUDA) explicitly; ``eager`` the classic
  ``AttnProcessor`` (for comparison); ``default`` leaves what diffusers picked (SDPA on torch 2).
- ``channels_last``: on for CUDA, off on CPU. UNet and VAE convolutions in NHWC memory format.
- ``vae_upcast``: on for float16, else off. Decode with the VAE in float32 (``vae.config.force_upcast``;
  SDXL's VAE overflows to NaN / black images in float16); the pipeline casts the VAE up before and back
  after every decode. bfloat16 needs none: it has float32's range.
- ``vae_tiling`` / ``vae_slicing`` = off: decode in overlapping tiles (memory at large sizes; changes the
  pixels of images larger than the VAE's tile) / one image of a batch at a time (same pixels).
- ``fuse_hot_mix`` = None: a mix fused into the base weights while it is active (base speed); any other
  mix first restores the exact base weights. ``fuse_backup`` = ``"cpu"``: where that exact copy lives.
- ``compile``: on for CUDA, off on CPU. ``torch.compile`` (``compile_mode`` = ``"default"``) of the UNet's
  blocks (``compile_scope`` = ``"blocks"``: every transformer block and resnet; ``"unet"``: one graph),
  warmed up at load at ``compile_warmup_size`` = 1024 px. Implies ``hotswap``.
- ``hotswap`` (= ``compile or fp8``): UNet LoRAs hot-swapped into ``hotswap_slots`` = 3 fixed slots
  padded to ``hotswap_rank`` (None: the largest adapter rank), so a compiled UNet never recompiles on a
  switch. The text encoders are not compiled: the text-encoder half of each LoRA loads the normal peft way.
- ``fp8`` = off: the UNet's token linears in float8 (:mod:`deskgen.fp8`); not with ``fuse_hot_mix``.
- ``deepcache_interval`` = None: DeepCache (:mod:`deskgen.deepcache`), an approximate speed tier that
  changes the image; never on by default, offered as the named profile ``deepcache``.

Why these defaults (measured on an H200 at 1024 px, 30 steps, BENCHMARKS.md "GPU suite"): bf16 has
fp32's range, so nothing overflows (no VAE upcast, no NaN guard) and it is as fast as fp16 on
Ampere/Hopper; SDPA is what torch 2 runs anyway, now explicit and reported; channels_last lets cuDNN
pick its NHWC convolution kernels. Unfused LoRA branches cost more than anything else (5.1 s/image
with two adapters vs 2.2 s fused: thousands of small kernels per step), so the hot mix is fused
(``fuse_hot_mix``, per deployment: only the operator knows which mix is hot). Compiling the blocks
took the fused mix from 2.19 to 1.78 s and hot-swapped mixes from 5.1 to 3.6 s, for a warm-up of
~15-50 s at replica start (before it takes traffic), so it is on for CUDA. FP8 halves the UNet's
linear weights (peak 7.1 GiB instead of 8.7-9.0) but its unfused slots keep it slow (4.7 s); DeepCache
every third step cut 1.78 s to 0.74 s at a measurable distance from the exact image.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.loras import LoraRegistry, quiet_adapter_load
from deskgen.mixes import BASE_MIX_ID, NAMED_MIXES, Mix, parse_mix_spec
from deskgen.paths import resolve, resolve_model_id
from deskgen.pngmeta import encode_png
from deskgen.prompt import DEFAULT_NEGATIVE_PROMPT

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from deskgen.deepcache import DeepCache
    from deskgen.fp8 import Fp8Report

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "fluently/Fluently-XL-v2"
DEFAULT_LORA_DIR = "models/tiny/loras"
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 30.0
DTYPES = ("float32", "float16", "bfloat16")
ATTENTIONS = ("sdpa", "eager", "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: ``unet``: one graph of the whole UNet; ``blocks``: each transformer block and resnet compiled on its
#: own (regional compilation: blocks of one shape share one compiled graph, so it compiles in a
#: fraction of the time, and the UNet's own forward stays eager, which DeepCache needs).
COMPILE_SCOPES = ("unet", "blocks")
#: The UNet block classes ``compile_scope="blocks"`` compiles.
COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
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
FUSE_BACKUPS = ("cpu", "device")
#: The pipeline components that carry LoRA layers.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: What the compile-mode warm-up generates (per image size; CFG on, as every default request).
WARMUP_PROMPT = "a desk setup"
WARMUP_STEPS = 2

#: ``on_step(step, total)``: called after each denoising step, ``step`` counting from 1.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SizeLimits:
    """Bounds on the image side (pixels, inclusive) and on the number of denoising steps."""

    min_side: int = 64
    max_side: int = 2048
    max_steps: int = 150


@dataclass(frozen=True)
class GenerationParams:
    """What to draw. :meth:`validate` checks every field; the generator calls it again before running."""

    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 0
    steps: int = 30
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024

    def validate(self, limits: SizeLimits = SizeLimits()) -> GenerationParams:
        """Return ``self`` if every field is in range, else raise InvalidParameter naming the first bad field."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidParameter("`prompt` must be a non-empty string.", field="prompt")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidParameter(
                f"`prompt` must be at most {MAX_PROMPT_CHARS} characters but has {len(self.prompt)}.", field="prompt"
            )
        if not isinstance(self.negative_prompt, str):
            raise InvalidParameter(
                f"`negative_prompt` must be a string but is {self.negative_prompt!r}.", field="negative_prompt"
            )
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise InvalidParameter(
                f"`negative_prompt` must be at most {MAX_PROMPT_CHARS} characters but has {len(self.negative_prompt)}.",
                field="negative_prompt",
            )
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("steps", self.steps, 1, limits.max_steps)
        if (
            not isinstance(self.guidance, (int, float))
            or isinstance(self.guidance, bool)
            or not math.isfinite(self.guidance)
            or not MIN_GUIDANCE <= self.guidance <= MAX_GUIDANCE
        ):
            raise InvalidParameter(
                f"`guidance` must be a finite number in [{MIN_GUIDANCE:g}, {MAX_GUIDANCE:g}] but is {self.guidance!r}.",
                field="guidance",
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            _check_int(name, value, limits.min_side, limits.max_side)
            if value % 8:
                # The VAE downsamples by 8: other sizes would be silently cropped by the pipeline.
                raise InvalidParameter(f"`{name}` must be a multiple of 8 but is {value}.", field=name)
        return self


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(f"`{name}` must be an integer but is {value!r}.", field=name)
    if not low <= value <= high:
        raise InvalidParameter(f"`{name}` must be in [{low}, {high}] but is {value}.", field=name)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidParameter(f"`{name}` must be one of {list(choices)} but is {value!r}.", field=name)


def _check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (optional and value is None):
        rule = "true, false or null" if optional else "true or false"
        raise InvalidParameter(f"`{name}` must be {rule} but is {value!r}.", field=name)


@dataclass
class GenerationResult:
    """One image and its recipe. ``metadata`` is JSON-serialisable; everything but ``timings`` is
    deterministic, so the same request always yields the same ``png(timings=False)`` bytes."""

    image: Image.Image
    metadata: dict[str, Any]

    def png(self, *, timings: bool = True) -> bytes:
        """PNG bytes with ``metadata`` in the ``deskgen`` iTXt chunk (without ``timings`` if False)."""
        metadata = self.metadata if timings else {k: v for k, v in self.metadata.items() if k != "timings"}
        return encode_png(self.image, metadata)


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


def _check_compile_combination(compile_: bool, settings: GeneratorSettings) -> None:
    """Raise InvalidParameter for settings that cannot go with ``compile_`` (the effective compile flag)."""
    if compile_ and settings.hotswap is False:
        raise InvalidParameter(
            "`hotswap` must be on (or null) when `compile` is on: a compiled UNet with one peft adapter per "
            "LoRA recompiles on every mix switch.",
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
    import dataclasses

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
    """Static settings of a generator; changing any of them means loading a new pipeline.

    ``device`` None picks ``cuda`` when available, else ``cpu``; ``dtype`` None picks ``bfloat16`` on a
    GPU that supports it (``float16`` otherwise) and ``float32`` on the CPU. Relative paths resolve
    against the project root (:func:`deskgen.paths.resolve`). The speed flags are described in the
    module docstring; a field left None takes the safe default for the resolved device and dtype.
    Construction validates every field's type and range (InvalidParameter naming the field);
    :meth:`resolve` also checks what depends on the device (CUDA present, ``vae_upcast`` vs dtype).
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
    #: A mix (built-in name or ``adapter:weight+...``) fused into the base weights while it is active, so
    #: it generates at base speed. Switching to another mix restores the base weights exactly.
    fuse_hot_mix: str | None = None
    #: ``"cpu"`` | ``"device"``: where the exact copy of the layers a fuse overwrites is kept.
    fuse_backup: str = "cpu"
    #: ``torch.compile`` the UNet; LoRAs are then hot-swapped into fixed slots (no recompile on a switch).
    #: None: on for CUDA (measured 1.2-1.4x on an H200, BENCHMARKS.md), off on the CPU.
    compile: bool | None = None
    #: The ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``, ...).
    compile_mode: str = "default"
    #: What is compiled: ``unet`` (one graph) or ``blocks`` (regional; see :data:`COMPILE_SCOPES`).
    compile_scope: str = "blocks"
    #: Hot-swap the UNet half of adapters into fixed LoRA slots instead of adding one peft adapter per
    #: LoRA (what keeps a compiled UNet from recompiling). None: on exactly when ``compile`` is; it may be
    #: on without ``compile`` (to test or measure it), not off with it.
    hotswap: bool | None = None
    #: Hotswap: how many adapters one mix may hold (each slot costs a LoRA branch per adapted layer).
    hotswap_slots: int = 3
    #: Hotswap: the LoRA rank every slot is padded to. None: the largest rank among the adapters in
    #: ``lora_dir`` at load time.
    hotswap_rank: int | None = None
    #: Compile mode: generate once at this square size at load time, so the replica compiles before it
    #: takes traffic. None: compile on the first request instead.
    compile_warmup_size: int | None = 1024
    #: UNet token linears in FP8 (:mod:`deskgen.fp8`). Implies ``hotswap``; not with ``fuse_hot_mix``.
    fp8: bool = False
    #: DeepCache (:mod:`deskgen.deepcache`): every ``deepcache_interval``-th step full, the others reuse
    #: the deep features. Changes the image: a speed profile of its own, None (off) by default; eager only.
    deepcache_interval: int | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_flag("channels_last", self.channels_last, optional=True)
        _check_flag("vae_upcast", self.vae_upcast, optional=True)
        for name in ("vae_tiling", "vae_slicing"):
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
        if self.fp8 and self.fuse_hot_mix is not None:
            raise InvalidParameter(
                "`fuse_hot_mix` must be null when `fp8` is on: an FP8 weight cannot hold a fused LoRA delta exactly.",
                field="fuse_hot_mix",
            )
        if self.deepcache_interval is not None:
            from deskgen.deepcache import MAX_INTERVAL

            _check_int("deepcache_interval", self.deepcache_interval, 2, MAX_INTERVAL)
        _check_compile_combination(bool(self.compile), self)
        _check_choice("fuse_backup", self.fuse_backup, FUSE_BACKUPS)
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
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidParameter(f"`device` is {self.device!r} but no CUDA device is available.", field="device")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        if self.dtype is None:
            if not device.startswith("cuda"):
                return "float32"
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        _check_choice("dtype", self.dtype, DTYPES)
        return self.dtype

    def resolve(self) -> RuntimeSettings:
        """The effective settings on this machine: every None replaced by its device default.

        Raises InvalidParameter if the device is unavailable, or as :meth:`resolve_for`.
        """
        device = self.resolved_device()
        return self.resolve_for(device, self.resolved_dtype(device))

    def resolve_for(self, device: str, dtype: str) -> RuntimeSettings:
        """The effective settings for ``device`` and ``dtype`` (not checked against this machine: a CPU
        host can tell what a CUDA replica would run). Raises InvalidParameter if ``vae_upcast`` is True
        with a dtype other than float16 (bfloat16 and float32 never overflow in the VAE)."""
        _check_choice("dtype", dtype, DTYPES)
        cuda = device.startswith("cuda")
        if self.vae_upcast and dtype != "float16":
            raise InvalidParameter(
                f"`vae_upcast` applies to float16 only but is True with dtype {dtype!r}.", field="vae_upcast"
            )
        hot = hot_mix_from_spec(self.fuse_hot_mix) if self.fuse_hot_mix is not None else None
        compile_ = cuda if self.compile is None else self.compile
        _check_compile_combination(compile_, self)
        return RuntimeSettings(
            device=device,
            dtype=dtype,
            attention=self.attention,
            channels_last=cuda if self.channels_last is None else self.channels_last,
            vae_upcast=(dtype == "float16") if self.vae_upcast is None else self.vae_upcast,
            vae_tiling=self.vae_tiling,
            vae_slicing=self.vae_slicing,
            fuse_hot_mix=hot.id if hot is not None else None,
            fuse_backup=self.fuse_backup,
            compile=compile_,
            compile_mode=self.compile_mode,
            compile_scope=self.compile_scope,
            hotswap=(compile_ or self.fp8) if self.hotswap is None else self.hotswap,
            hotswap_slots=self.hotswap_slots,
            hotswap_rank=self.hotswap_rank,
            compile_warmup_size=self.compile_warmup_size,
            fp8=self.fp8,
            deepcache_interval=self.deepcache_interval,
        )

    def describe(self) -> dict[str, Any]:
        """The effective speed flags by name (JSON-serialisable; for metadata and benchmark tables)."""
        return self.resolve().describe()


@dataclass(frozen=True)
class RuntimeSettings:
    """The effective speed settings of one generator (what :meth:`GeneratorSettings.resolve` returns).

    ``fuse_hot_mix`` is the canonical mix id; ``hotswap_rank`` None means "the largest adapter rank",
    fixed when the slots are built (see :attr:`DeskGenerator.hotswap_rank`).
    """

    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdpa"
    channels_last: bool = False
    vae_upcast: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    fuse_hot_mix: str | None = None
    fuse_backup: str = "cpu"
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    hotswap: bool = False
    hotswap_slots: int = 3
    hotswap_rank: int | None = None
    compile_warmup_size: int | None = 1024
    fp8: bool = False
    deepcache_interval: int | None = None

    def hot_mix(self) -> Mix | None:
        return hot_mix_from_spec(self.fuse_hot_mix) if self.fuse_hot_mix is not None else None

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def optimise_pipeline(pipe: Any, runtime: RuntimeSettings) -> None:
    """Apply the pipeline-wide speed settings of ``runtime`` to a loaded pipeline (in place, idempotent).

    Attention processors, memory format and VAE decode settings; not LoRA state and not compilation,
    which :class:`DeskGenerator` owns.
    """
    import torch

    # 1. Attention: set the processor explicitly so what runs is what the metadata says.
    if runtime.attention != "default":
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processor = AttnProcessor2_0() if runtime.attention == "sdpa" else AttnProcessor()
        pipe.unet.set_attn_processor(processor)
        pipe.vae.set_attn_processor(processor)
    # 2. Memory format: NHWC convolutions (cuDNN's fast path for fp16/bf16 on tensor cores).
    if runtime.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    # 3. VAE: SDXL's VAE overflows in float16; with force_upcast the pipeline decodes in float32 (it
    #    casts the VAE up before and back after each decode). bfloat16 has float32's range: no upcast.
    if runtime.dtype == "float16":
        pipe.vae.register_to_config(force_upcast=runtime.vae_upcast)
    if runtime.vae_tiling:
        pipe.vae.enable_tiling()
    if runtime.vae_slicing:
        pipe.vae.enable_slicing()


def compile_unet(unet: Any, mode: str, scope: str) -> int:
    """``torch.compile`` the UNet (``scope="unet"``) or each of its :data:`COMPILED_BLOCKS` (``"blocks"``),
    in place and lazily (the first call per shape compiles). Returns the number of modules wrapped."""
    if scope == "unet":
        unet.compile(mode=mode)
        return 1
    import torch

    blocks = [m for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    # Every compiled block runs through nn.Module._call_impl, one code object to dynamo: its cache must
    # hold one entry per block shape (SDXL: 2 transformer and ~15 resnet shapes), and static shapes keep
    # one specialised graph per shape instead of dynamic-shape kernels.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return len(blocks)


@dataclass
class _Timer:
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class _Fused:
    """A mix fused into the base weights: which components, and the base parameters it overwrote."""

    mix: Mix
    components: list[str]
    params: list[Any]


class _PristineWeights:
    """Exact copies of the base-layer parameters that fusing overwrites; :meth:`restore` puts them back
    bit for bit, where peft's ``unmerge`` subtracts the delta again and drifts (``(W + d) - d != W`` in
    floating point, worse in fp16, and it accumulates over fuse/unfuse cycles).

    A parameter is copied once for the life of the generator: only a fuse changes base weights, and every
    unfuse restores them, so the first copy stays exact. ``where="cpu"`` keeps the copies in (pinned)
    host memory — no GPU memory, a host-to-device copy per unfuse; ``"device"`` keeps them next to the
    weights — fastest restore, costs their size in GPU memory.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self._copies: dict[int, tuple[Any, Any]] = {}

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
                    copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=True)
                    copy.copy_(param.detach())
                # The entry holds the parameter itself, so its id() cannot be reused while the copy lives.
                self._copies[id(param)] = (param, copy)

    def restore(self, params: Iterable[Any]) -> None:
        import torch

        with torch.no_grad():
            for param in params:
                # From pinned memory the copy is asynchronous but stream-ordered before any later kernel.
                param.data.copy_(self._copies[id(param)][1], non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(copy.numel() * copy.element_size() for _, copy in self._copies.values())


@dataclass
class _UnetPart:
    """The UNet half of an adapter file, kept ready for hot-swapping (hotswap mode)."""

    state_dict: dict[str, Any]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    modules: list[str]  # UNet modules it adapts (those that exist in this UNet)
    rank: int


def read_adapter(pipe: Any, path: Path) -> tuple[dict[str, Any], dict[str, float] | None, dict[str, Any] | None]:
    """``(state_dict, network_alphas, metadata)`` of a LoRA file in diffusers' naming (kohya converted),
    UNet keys prefixed ``unet.``, text-encoder keys ``text_encoder.`` / ``text_encoder_2.``."""
    with quiet_adapter_load():
        state_dict, alphas, metadata = pipe.lora_state_dict(
            str(path.parent), weight_name=path.name, unet_config=pipe.unet.config, return_lora_metadata=True
        )
    return state_dict, alphas, metadata


def unet_part(
    pipe: Any, state_dict: dict[str, Any], alphas: dict[str, float] | None, metadata: dict[str, Any] | None
) -> _UnetPart:
    """The UNet half of an adapter read by :func:`read_adapter`, with the modules of this UNet it adapts
    and its largest rank."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet_sd = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    peft_sd = {k.removeprefix("unet."): v for k, v in unet_sd.items()}
    if peft_sd and not any("lora_A" in k for k in peft_sd):
        peft_sd = convert_unet_state_dict_to_peft(peft_sd)
    modules, rank = [], 0
    for key, value in peft_sd.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            rank = max(rank, int(value.shape[0]))
            with contextlib.suppress(AttributeError):
                pipe.unet.get_submodule(name)
                modules.append(name)
    return _UnetPart(unet_sd, alphas, metadata, sorted(modules), rank)


class _HotswapSlots:
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
    has a larger rank, is refused with a RuntimeError (restart the replica to include it).
    """

    def __init__(self, pipe: Any, parts: dict[str, _UnetPart], count: int, rank: int | None) -> None:
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

    def check_fits(self, name: str, part: _UnetPart) -> None:
        """Raise RuntimeError if adapter ``name`` cannot be hot-swapped into these slots."""
        outside = sorted(set(part.modules) - set(self.union))
        if outside:
            raise RuntimeError(
                f"LoRA {name!r} adapts {len(outside)} UNet layers (e.g. {outside[0]}) that the compiled LoRA "
                "slots do not have; the slots are laid out from the adapters present at load time: restart "
                "the replica to include it."
            )
        if part.rank > self.rank:
            raise RuntimeError(
                f"LoRA {name!r} has rank {part.rank} but the compiled LoRA slots have rank {self.rank} "
                "(`hotswap_rank`): raise it and restart the replica."
            )

    def place(self, mix: Mix, parts: dict[str, _UnetPart]) -> dict[str, str]:
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


class DeskGenerator:
    """ONE base pipeline per object, and the LoRA mixes applied to it.

    Responsibilities:
    - load adapters from the :class:`LoraRegistry` once, lazily, under their public names, and check
      that every layer a file names actually received its weights;
    - activate a mix on the same pipeline (never a base reload): ``set_adapters``, or ``disable_lora``
      for the base mix; with ``fuse_hot_mix``, fuse that mix into the base weights while it is active
      and restore the exact base weights when another mix is asked for; in hotswap (compile) mode, hot-swap the
      UNet part into fixed slots (:class:`_HotswapSlots`) so the compiled UNet is never recompiled;
    - unload adapters the caller no longer wants (idempotent; the hot mix's adapters stay);
    - generate deterministically (same params + mix -> the same pixels) and attach the recipe,
      including the effective speed flags (``metadata["runtime"]``).

    One diffusers pipeline is not thread-safe and its LoRA state is shared by every call, so activating a
    mix and generating with it happen together under ``self.lock`` (an RLock: callers such as a Serve
    multiplexed loader may take it around several of these calls).

    Determinism: on a given device, dtype and settings, the same seed + mix gives the same bytes, also
    after switching away and back, and the base mix (or all weights 0) gives the bytes of a pipeline that
    never loaded a LoRA. Two documented exceptions: the fused hot mix is not bit-identical to the same
    mix unfused (the fused weight ``W + sum(s*B@A)`` is rounded once, the unfused path adds the branches
    to the layer output: another summation order; ``tests/unit/test_generator_speed.py`` measures the
    difference), and with ``compile`` the compiled UNet (other kernels, fused ops) is not bit-identical
    to the eager one (measured: at most 1 grey level on the tiny model), so there "base bit-for-bit"
    means the compiled base of the same replica. Hot-swap slots alone (``hotswap`` without ``compile``)
    change no bit on CPU fp32: the zero-padded rank and the 0-scale slots add exact zeros.
    """

    base_loads: ClassVar[int] = 0
    _base_loads_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        pipe: Any,
        registry: LoraRegistry,
        *,
        model_id: str,
        device: str,
        dtype: str,
        limits: SizeLimits = SizeLimits(),
        runtime: RuntimeSettings | None = None,
    ) -> None:
        """Wrap an already loaded (and :func:`optimise_pipeline`-d) pipeline. With ``runtime.compile`` this
        builds the LoRA slots and compiles the UNet (lazily: the first generation per shape compiles)."""
        import dataclasses

        self.pipe = pipe
        self.registry = registry
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        #: Bounds :meth:`generate` enforces; a deployment may replace them on reconfigure.
        self.limits = limits
        self.lock = threading.RLock()
        self._loaded: dict[str, str] = {}  # public adapter name -> peft adapter name
        self._mix = Mix(())  # the active mix: what generate() runs unless told otherwise
        self._in_sync = True  # whether the pipeline's LoRA layers currently compute self._mix
        runtime = runtime or RuntimeSettings()
        self.runtime = dataclasses.replace(runtime, device=device, dtype=dtype)
        self._hot = self.runtime.hot_mix()
        self._pristine = _PristineWeights(self.runtime.fuse_backup)
        self._fused: _Fused | None = None
        self._slots: _HotswapSlots | None = None
        self._parts: dict[str, _UnetPart] = {}  # hotswap mode: loaded adapters' UNet halves
        #: Seconds the load-time warm-up took (None if there was none).
        self.warmup_s: float | None = None
        pipe.set_progress_bar_config(disable=True)
        if self.runtime.hotswap:
            self._build_slots()
        self.fp8_report: Fp8Report | None = None
        if self.runtime.fp8:
            from deskgen.fp8 import quantize_unet_linears

            timer = _Timer()
            self.fp8_report = quantize_unet_linears(self.pipe.unet)
            log.info(
                "fp8: %d UNet linears (%.0f%% of its parameters) in float8_e4m3 in %.2f s, %.2f GB saved",
                self.fp8_report.layers, 100 * self.fp8_report.fraction, timer.seconds(), self.fp8_report.bytes_saved / 1e9,
            )  # fmt: skip
        self._deepcache: DeepCache | None = None
        if self.runtime.deepcache_interval is not None:
            from deskgen.deepcache import DeepCache

            self._deepcache = DeepCache(self.pipe.unet, self.runtime.deepcache_interval)
        if self.runtime.compile:
            timer = _Timer()
            compile_unet(self.pipe.unet, self.runtime.compile_mode, self.runtime.compile_scope)
            log.info(
                "UNet (%s) wrapped by torch.compile(mode=%r) in %.2f s",
                self.runtime.compile_scope, self.runtime.compile_mode, timer.seconds(),
            )  # fmt: skip

    @property
    def active_mix_id(self) -> str:
        """Canonical id of the mix last activated (``"base"`` at first and after its adapters were unloaded)."""
        return self._mix.id

    @property
    def fused_mix_id(self) -> str | None:
        """Canonical id of the mix fused into the base weights right now, or None."""
        return self._fused.mix.id if self._fused is not None else None

    def describe(self) -> dict[str, Any]:
        """The effective speed flags of this generator (hotswap_rank resolved in hotswap mode)."""
        return self.runtime.describe()

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, settings: GeneratorSettings) -> DeskGenerator:
        """Load the base pipeline named by ``settings.model_id`` (hub id or local folder) onto the device,
        apply the speed settings, fuse the hot mix (if any) and, in compile mode, warm up (compile).

        Raises ModelFilesMissing if a local model folder or the LoRA folder does not exist, InvalidParameter
        (naming the field) for settings that do not fit this machine or the LoRA folder.
        """
        import torch
        from diffusers import StableDiffusionXLPipeline

        runtime = settings.resolve()
        registry = LoraRegistry(resolve(settings.lora_dir))
        hot = runtime.hot_mix()
        if hot is not None:
            missing = [name for name in hot.adapters if name not in registry.names()]
            if missing:
                # A setting that does not fit the LoRA folder: a configuration error (400), not a 404.
                raise InvalidParameter(
                    f"`fuse_hot_mix`: unknown adapter {missing[0]!r}; available adapters are {registry.names()}.",
                    field="fuse_hot_mix",
                )
        source = resolve_model_id(settings.model_id)
        if Path(source).is_absolute() and not Path(source).is_dir():
            raise ModelFilesMissing("SDXL pipeline folder", source)
        timer = _Timer()
        pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=getattr(torch, runtime.dtype))
        pipe.to(runtime.device)
        optimise_pipeline(pipe, runtime)
        with cls._base_loads_lock:
            DeskGenerator.base_loads += 1
        gen = cls(pipe, registry, model_id=settings.model_id, device=runtime.device, dtype=runtime.dtype, runtime=runtime)
        log.info("loaded %s in %.2f s with %s", settings.model_id, timer.seconds(), gen.describe())
        if runtime.compile and runtime.compile_warmup_size is not None:
            gen.warm_up(runtime.compile_warmup_size)
        elif hot is not None:
            gen.activate_mix(hot)
        return gen

    def warm_up(self, size: int) -> float:
        """Generate once at ``size`` x ``size`` with the base mix (and once with the hot mix, if any, which
        leaves it active), so compilation happens now rather than in a client's request. Returns seconds."""
        timer = _Timer()
        params = GenerationParams(prompt=WARMUP_PROMPT, steps=WARMUP_STEPS, width=size, height=size)
        for mix in [Mix(()), *([self._hot] if self._hot is not None else [])]:
            self.generate(params, mix)
        self.warmup_s = timer.seconds()
        log.info("warm-up at %d px took %.1f s", size, self.warmup_s)
        return self.warmup_s

    def _build_slots(self) -> None:
        import dataclasses

        timer = _Timer()
        parts = {
            name: unet_part(self.pipe, *read_adapter(self.pipe, self.registry.path(name)))
            for name in self.registry.names()
        }
        self._slots = _HotswapSlots(self.pipe, parts, self.runtime.hotswap_slots, self.runtime.hotswap_rank)
        self.runtime = dataclasses.replace(self.runtime, hotswap_rank=self._slots.rank)
        log.info(
            "hotswap: %d LoRA slots of rank %d on %d UNet layers, built in %.2f s",
            len(self._slots.names), self._slots.rank, len(self._slots.union), timer.seconds(),
        )  # fmt: skip

    def available_adapters(self) -> list[str]:
        """Adapters the registry can load (not necessarily loaded yet)."""
        return self.registry.names()

    def loaded_adapters(self) -> set[str]:
        """Adapters currently held by the pipeline."""
        with self.lock:
            return set(self._loaded)

    def ensure_adapters(self, names: Iterable[str]) -> None:
        """Load each adapter in ``names`` not loaded yet. An unknown name raises UnknownMix before any load;
        a file whose layers do not all match the model raises RuntimeError and stays unloaded."""
        with self.lock:
            # Resolve every name first, so an unknown one fails before anything is loaded.
            paths = {name: self.registry.path(name) for name in names if name not in self._loaded}
            if paths:
                # Never load into fused layers: restore the exact base first (re-fused on the next activate).
                self._unfuse()
            for name, path in paths.items():
                slot = peft_adapter_name(name)
                timer = _Timer()
                # Loading activates the new adapter in diffusers: the LoRA state no longer matches the
                # active mix, whether the load succeeds or not.
                self._in_sync = False
                try:
                    if self._slots is not None:
                        self._load_for_hotswap(self._slots, name, slot, path)
                    else:
                        with quiet_adapter_load():
                            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=slot)
                except Exception:
                    # A load that fails half-way may leave layers injected: remove them, keep the error.
                    with contextlib.suppress(Exception):
                        self._delete_layers(slot)
                    self._parts.pop(name, None)
                    raise
                self._loaded[name] = slot
                self._check_loaded(name, slot, path)
                log.info("loaded LoRA %s (%s layout) in %.3f s", name, self.registry.layout(name), timer.seconds())

    def _load_for_hotswap(self, slots: _HotswapSlots, name: str, slot: str, path: Path) -> None:
        # Hotswap mode: the text-encoder half loads the normal way (the text encoders are not compiled,
        # and diffusers cannot hot-swap them); the UNet half waits, on the device, for a slot.
        import torch

        state_dict, alphas, metadata = read_adapter(self.pipe, path)
        part = unet_part(self.pipe, state_dict, alphas, metadata)
        slots.check_fits(name, part)
        unet_dtype = self.pipe.unet.dtype
        part.state_dict = {
            k: v.to(device=self.device, dtype=unet_dtype if torch.is_floating_point(v) else v.dtype)
            for k, v in part.state_dict.items()
        }
        for component in ("text_encoder", "text_encoder_2"):
            with quiet_adapter_load():
                self.pipe.load_lora_into_text_encoder(
                    state_dict, network_alphas=alphas, text_encoder=getattr(self.pipe, component), prefix=component,
                    lora_scale=self.pipe.lora_scale, adapter_name=slot, metadata=metadata, _pipeline=self.pipe,
                )  # fmt: skip
        self._parts[name] = part

    def _check_loaded(self, name: str, slot: str, path: Path) -> None:
        # diffusers warns, but does not fail, when a LoRA's keys do not match the model (e.g. a kohya
        # name the conversion maps to a module that does not exist): count what really got weights.
        components = LORA_COMPONENTS if self._slots is None else LORA_COMPONENTS[1:]
        loaded = sum(len(self._layers_with(component, [slot])) for component in components)
        if self._slots is not None:
            loaded += len(self._parts[name].modules)
        expected = self.registry.module_count(name)
        if loaded != expected:
            self._delete([name])
            raise RuntimeError(
                f"LoRA {name!r} ({path}): only {loaded} of its {expected} layers match this model; "
                "is it a LoRA for SDXL, and for this base model?"
            )

    def _layers_with(self, component: str, peft_names: Iterable[str]) -> list[Any]:
        """The LoRA layers of ``component`` that hold any of ``peft_names``."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = getattr(self.pipe, component, None)
        if model is None:
            return []
        names = set(peft_names)
        return [
            m for m in model.modules() if isinstance(m, BaseTunerLayer) and names & set(getattr(m, "lora_A", {}))
        ]

    # -- mixes ----------------------------------------------------------------------------------

    def activate_mix(self, mix: Mix) -> float:
        """Make ``mix`` the pipeline's LoRA state; returns the seconds it took (0 if already active).

        Loads missing adapters first; the base mix disables every LoRA. Unknown adapter -> UnknownMix; in
        hotswap mode a mix with more adapters than ``hotswap_slots`` -> InvalidParameter. Activating the
        hot mix fuses it; activating any other mix first restores the exact base weights.
        """
        with self.lock:
            timer = _Timer()
            if self._in_sync and self._mix == mix:
                return 0.0
            if self._slots is not None and len(mix.adapters) > len(self._slots.names):
                raise InvalidParameter(
                    f"`mix` {mix.id!r} has {len(mix.adapters)} adapters but this generator holds at most "
                    f"{len(self._slots.names)} at once (`hotswap_slots`).",
                    field="mix",
                )
            self._unfuse()
            # Until the new mix is fully applied the LoRA state matches no mix: a failure below (a bad
            # file, a failed swap) leaves it marked so, and the next activation re-applies everything.
            self._in_sync = False
            self.ensure_adapters(mix.adapters)
            if self._slots is not None:
                self._apply_hotswap(self._slots, mix)
            elif not mix.weights:
                if self._loaded:
                    self.pipe.disable_lora()
            else:
                # set_adapters does not undo disable_lora (peft keeps a separate "disabled" flag).
                self.pipe.enable_lora()
                self.pipe.set_adapters(
                    [self._loaded[name] for name in mix.adapters],
                    adapter_weights=[weight for _, weight in mix.weights],
                )
            self._mix = mix
            self._in_sync = True
            if self._hot is not None and mix == self._hot:
                self._fuse(mix)
            return timer.seconds()

    def _apply_hotswap(self, slots: _HotswapSlots, mix: Mix) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        placed = slots.place(mix, self._parts)
        slots.set_weights({placed[name]: weight for name, weight in mix.weights})
        for component in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, component)
            present = getattr(encoder, "peft_config", {})
            pairs = [(self._loaded[n], w) for n, w in mix.weights if self._loaded[n] in present]
            if pairs:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([n for n, _ in pairs], encoder, [w for _, w in pairs])
            else:
                disable_lora_for_text_encoder(encoder)

    def _peft_names(self, mix: Mix) -> dict[str, list[str]]:
        """component -> the peft adapter names ``mix`` is made of there."""
        names = [self._loaded[name] for name in mix.adapters]
        if self._slots is None:
            return dict.fromkeys(LORA_COMPONENTS, names)
        slots = [slot for slot, held in self._slots.holds.items() if held in mix.adapters]
        return {"unet": slots, "text_encoder": names, "text_encoder_2": names}

    def _fuse(self, mix: Mix) -> None:
        # Fuse the active mix into the base weights: the LoRA layers then run only their base layer.
        # The exact base values of every layer touched are kept first, to be restored by _unfuse.
        timer = _Timer()
        components: list[str] = []
        params: list[Any] = []
        for component, names in self._peft_names(mix).items():
            layers = self._layers_with(component, names)
            if layers:
                components.append(component)
                params += [p for layer in layers for p in layer.get_base_layer().parameters(recurse=False)]
        self._pristine.save(params)
        for component in components:
            self.pipe.fuse_lora(components=[component], adapter_names=self._peft_names(mix)[component])
        self._fused = _Fused(mix, components, params)
        log.info("fused %s into %d base tensors in %.3f s", mix.id, len(params), timer.seconds())

    def _unfuse(self) -> None:
        # unfuse_lora keeps diffusers' and peft's bookkeeping right (merged flags); its subtraction is
        # then overwritten by the exact base values.
        fused = self._fused
        if fused is None:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already unmerged")
            self.pipe.unfuse_lora(components=fused.components)
        self._pristine.restore(fused.params)
        self._fused = None

    def unload_adapters(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete every loaded adapter not in ``keep`` (nor in the hot mix); returns the deleted names (sorted).

        Idempotent (a second call returns []). If the active mix used a deleted adapter, the pipeline falls
        back to the base mix, so it never runs with a half-deleted mix.
        """
        keep = set(keep) | set(self._hot.adapters if self._hot is not None else ())
        with self.lock:
            doomed = sorted(name for name in self._loaded if name not in keep)
            if doomed:
                self._delete(doomed)
            return doomed

    def _delete_layers(self, slot: str) -> None:
        if self._slots is None:
            self.pipe.delete_adapters([slot])
            return
        from diffusers.utils.peft_utils import delete_adapter_layers

        for component in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, component)
            if slot in getattr(encoder, "peft_config", {}):
                delete_adapter_layers(encoder, slot)

    def _delete(self, names: list[str]) -> None:
        self._unfuse()  # never delete adapters from fused layers: restore the exact base first
        with warnings.catch_warnings():
            # peft: "Adapter X was active which is now deleted. Setting active adapter to Y." We re-apply below.
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for name in names:
                self._delete_layers(self._loaded.pop(name))
                self._parts.pop(name, None)
                if self._slots is not None:
                    self._slots.release(name)
        # peft re-points its active adapters when one is deleted: re-apply the mix on the next activate.
        self._in_sync = False
        if set(self._mix.adapters) & set(names):
            # The active mix lost an adapter: fall back to the base mix now rather than keep half of it.
            self._mix = Mix(())
            if self._slots is not None:
                self._apply_hotswap(self._slots, self._mix)
            elif self._loaded:
                self.pipe.disable_lora()
            self._in_sync = True

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, params: GenerationParams, mix: Mix, on_step: StepCallback | None = None
    ) -> GenerationResult:
        """Draw one image of ``params`` with ``mix`` active.

        Deterministic per device, dtype and settings: a ``torch.Generator`` seeded with ``params.seed``
        drives all noise. ``on_step(step, total)`` runs after each denoising step (1..total, in order)
        inside the lock, so it must be quick and must not call back into this generator from another thread.
        """
        import torch

        # 1. Validate (again: a caller may bypass the ingress).
        params.validate(self.limits)
        with self.lock:
            # 2. Activate the mix on the one pipeline (fusing it if it is the hot mix).
            activate_s = self.activate_mix(mix)
            adapters = {name: self.registry.sha256(name) for name in mix.adapters}
            runtime = {**self.describe(), "fused": self._fused is not None}

            # 3. Denoise and decode.
            def step_end(pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                if on_step is not None:
                    on_step(step_index + 1, pipe.num_timesteps)
                return callback_kwargs

            timer = _Timer()
            if self._deepcache is not None:
                self._deepcache.reset()
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            output = self.pipe(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                num_inference_steps=params.steps,
                guidance_scale=params.guidance,
                width=params.width,
                height=params.height,
                generator=generator,
                callback_on_step_end=step_end if on_step is not None else None,
                output_type="pil",
            )
            generate_s = timer.seconds()

        # 4. Attach the recipe.
        metadata: dict[str, Any] = {
            **asdict(params),
            "mix_id": mix.id,
            "mix": mix.as_dict(),
            "adapters": adapters,
            "model_id": self.model_id,
            "runtime": runtime,
            "timings": {"activate_s": round(activate_s, 6), "generate_s": round(generate_s, 6)},
        }
        return GenerationResult(image=output.images[0], metadata=metadata)


def peft_adapter_name(name: str) -> str:
    """The adapter name inside peft/diffusers for public adapter ``name``."""
    # A public name like "training" or "to" would collide with attributes of peft's ModuleDicts; a
    # fixed prefix keeps every valid public name (deskgen.mixes.ADAPTER_NAME_RE) safe inside peft.
    return f"style_{name}"
