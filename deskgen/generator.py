"""The generator stage: one SDXL pipeline, style LoRAs mixed onto it, images with their recipe attached.

Ray-free on purpose: ``deployments/generator.py`` wraps :class:`DeskGenerator` and adds multiplexing,
batching and config; unit tests drive this class directly on the tiny models.

    gen = DeskGenerator.from_pretrained(GeneratorSettings(model_id="models/tiny/sdxl"))
    result = gen.generate(GenerationParams(prompt="a desk setup", width=64, height=64, steps=4), mix)
    result.png()  # PNG bytes with the metadata (seed, mix, adapter hashes, ...) in an iTXt chunk
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
from deskgen.mixes import Mix
from deskgen.paths import resolve, resolve_model_id
from deskgen.pngmeta import encode_png
from deskgen.prompt import DEFAULT_NEGATIVE_PROMPT

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "fluently/Fluently-XL-v2"
DEFAULT_LORA_DIR = "models/tiny/loras"
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 30.0
DTYPES = ("float32", "float16", "bfloat16")

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


@dataclass(frozen=True)
class GeneratorSettings:
    """Static settings of a generator; changing any of them means loading a new pipeline.

    ``device`` None picks ``cuda`` when available, else ``cpu``; ``dtype`` None picks ``bfloat16`` on a
    GPU that supports it (``float16`` otherwise) and ``float32`` on the CPU. Relative paths resolve
    against the project root (:func:`deskgen.paths.resolve`).
    """

    model_id: str = DEFAULT_MODEL_ID
    lora_dir: str = DEFAULT_LORA_DIR
    device: str | None = None
    dtype: str | None = None

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
        if self.dtype not in DTYPES:
            raise InvalidParameter(f"`dtype` must be one of {list(DTYPES)} but is {self.dtype!r}.", field="dtype")
        return self.dtype


@dataclass
class _Timer:
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class DeskGenerator:
    """ONE base pipeline per object, and the LoRA mixes applied to it.

    Responsibilities:
    - load adapters from the :class:`LoraRegistry` once, lazily, under their public names, and check
      that every layer a file names actually received its weights;
    - activate a mix with ``set_adapters`` on the same pipeline (never a base reload), or disable the
      LoRAs for the base mix; unload adapters the caller no longer wants (idempotent);
    - generate deterministically (same params + mix -> the same pixels) and attach the recipe.

    One diffusers pipeline is not thread-safe and its LoRA state is shared by every call, so activating a
    mix and generating with it happen together under ``self.lock`` (an RLock: callers such as a Serve
    multiplexed loader may take it around several of these calls).
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
    ) -> None:
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
        pipe.set_progress_bar_config(disable=True)

    @property
    def active_mix_id(self) -> str:
        """Canonical id of the mix last activated (``"base"`` at first and after its adapters were unloaded)."""
        return self._mix.id

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, settings: GeneratorSettings) -> DeskGenerator:
        """Load the base pipeline named by ``settings.model_id`` (hub id or local folder) onto the device.

        Raises ModelFilesMissing if a local model folder or the LoRA folder does not exist.
        """
        import torch
        from diffusers import StableDiffusionXLPipeline

        registry = LoraRegistry(resolve(settings.lora_dir))
        source = resolve_model_id(settings.model_id)
        if Path(source).is_absolute() and not Path(source).is_dir():
            raise ModelFilesMissing("SDXL pipeline folder", source)
        device = settings.resolved_device()
        dtype = settings.resolved_dtype(device)
        timer = _Timer()
        pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=getattr(torch, dtype))
        pipe.to(device)
        with cls._base_loads_lock:
            DeskGenerator.base_loads += 1
        log.info("loaded %s on %s/%s in %.2f s", settings.model_id, device, dtype, timer.seconds())
        return cls(pipe, registry, model_id=settings.model_id, device=device, dtype=dtype)

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
            for name, path in paths.items():
                slot = peft_adapter_name(name)
                timer = _Timer()
                # Loading activates the new adapter in diffusers: the LoRA state no longer matches the
                # active mix, whether the load succeeds or not.
                self._in_sync = False
                try:
                    with quiet_adapter_load():
                        self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=slot)
                except Exception:
                    # A load that fails half-way may leave layers injected: remove them, keep the error.
                    with contextlib.suppress(Exception):
                        self.pipe.delete_adapters([slot])
                    raise
                self._loaded[name] = slot
                self._check_loaded(name, slot, path)
                log.info("loaded LoRA %s (%s layout) in %.3f s", name, self.registry.layout(name), timer.seconds())

    def _check_loaded(self, name: str, slot: str, path: Path) -> None:
        # diffusers warns, but does not fail, when a LoRA's keys do not match the model (e.g. a kohya
        # name the conversion maps to a module that does not exist): count what really got weights.
        from peft.tuners.tuners_utils import BaseTunerLayer

        loaded = 0
        for component in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and slot in getattr(module, "lora_A", {}):
                    loaded += 1
        expected = self.registry.module_count(name)
        if loaded != expected:
            self._delete([name])
            raise RuntimeError(
                f"LoRA {name!r} ({path}): only {loaded} of its {expected} layers match this model; "
                "is it a LoRA for SDXL, and for this base model?"
            )

    def activate_mix(self, mix: Mix) -> float:
        """Make ``mix`` the pipeline's LoRA state; returns the seconds it took (0 if already active).

        Loads missing adapters first; the base mix disables every LoRA. Unknown adapter -> UnknownMix.
        """
        with self.lock:
            timer = _Timer()
            if self._in_sync and self._mix == mix:
                return 0.0
            self.ensure_adapters(mix.adapters)
            if not mix.weights:
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
            return timer.seconds()

    def unload_adapters(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete every loaded adapter not in ``keep``; returns the deleted names (sorted).

        Idempotent (a second call returns []). If the active mix used a deleted adapter, the pipeline falls
        back to the base mix, so it never runs with a half-deleted mix.
        """
        keep = set(keep)
        with self.lock:
            doomed = sorted(name for name in self._loaded if name not in keep)
            if doomed:
                self._delete(doomed)
            return doomed

    def _delete(self, names: list[str]) -> None:
        with warnings.catch_warnings():
            # peft: "Adapter X was active which is now deleted. Setting active adapter to Y." We re-apply below.
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.pipe.delete_adapters([self._loaded.pop(name) for name in names])
        # peft re-points its active adapters when one is deleted: re-apply the mix on the next activate.
        self._in_sync = False
        if set(self._mix.adapters) & set(names):
            # The active mix lost an adapter: fall back to the base mix now rather than keep half of it.
            self._mix = Mix(())
            if self._loaded:
                self.pipe.disable_lora()
            self._in_sync = True

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, params: GenerationParams, mix: Mix, on_step: StepCallback | None = None
    ) -> GenerationResult:
        """Draw one image of ``params`` with ``mix`` active.

        Deterministic per device and dtype: a ``torch.Generator`` seeded with ``params.seed`` drives all
        noise. ``on_step(step, total)`` runs after each denoising step (1..total, in order) inside the
        lock, so it must be quick and must not call back into this generator from another thread.
        """
        import torch

        # 1. Validate (again: a caller may bypass the ingress).
        params.validate(self.limits)
        with self.lock:
            # 2. Activate the mix on the one pipeline.
            activate_s = self.activate_mix(mix)
            adapters = {name: self.registry.sha256(name) for name in mix.adapters}

            # 3. Denoise and decode.
            def step_end(pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                if on_step is not None:
                    on_step(step_index + 1, pipe.num_timesteps)
                return callback_kwargs

            timer = _Timer()
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
            "timings": {"activate_s": round(activate_s, 6), "generate_s": round(generate_s, 6)},
        }
        return GenerationResult(image=output.images[0], metadata=metadata)


def peft_adapter_name(name: str) -> str:
    """The adapter name inside peft/diffusers for public adapter ``name``."""
    # A public name like "training" or "to" would collide with attributes of peft's ModuleDicts; a
    # fixed prefix keeps every valid public name (deskgen.mixes.ADAPTER_NAME_RE) safe inside peft.
    return f"style_{name}"

