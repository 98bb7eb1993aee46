"""DeskGenerator: ONE SDXL pipeline, the LoRA mixes applied to it, images with their recipe attached."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from deskgen.errors import AdapterUnavailable, DeskgenError, InvalidParameter, ModelFilesMissing
from deskgen.generator import residual
from deskgen.generator.adapters import (
    PeftAdapters,
    SlotAdapters,
    Strategy,
    build_strategy,
    mapping_problem,
    peft_adapter_name,
    read_adapter,
    unreadable_problem,
)
from deskgen.generator.optimise import compile_unet, optimise_pipeline
from deskgen.generator.params import GenerationParams, GenerationResult, StepCallback
from deskgen.generator.prompts import PromptEncoder
from deskgen.generator.recipe import apply_scheduler, describe_scheduler, model_revision, weights_variant
from deskgen.generator.settings import GeneratorSettings
from deskgen.generator.switching import MixSwitcher
from deskgen.limits import DEFAULT_SIZE_LIMITS, SizeLimits
from deskgen.loras import LoraRegistry
from deskgen.mixes import Mix
from deskgen.paths import resolve, resolve_model_id

if TYPE_CHECKING:
    from deskgen.deepcache import DeepCache
    from deskgen.fp8 import Fp8Report

log = logging.getLogger(__name__)

#: What the compile-mode warm-up generates (per image size; CFG on, as every default request).
WARMUP_PROMPT = "a desk setup"
WARMUP_STEPS = 2


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class DeskGenerator:
    """ONE base pipeline per object, and the LoRA mixes applied to it.

    Responsibilities:
    - check every LoRA file when it starts (header, then the key mapping onto this model; no load): a
      file that cannot be loaded is listed in :attr:`unavailable` with the reason, and a mix naming it
      raises :class:`AdapterUnavailable` (422) while every other mix keeps working;
    - load adapters from the :class:`LoraRegistry` once, lazily, under their public names, and check
      that every layer a file names actually received its weights;
    - embed prompts longer than CLIP's 77 tokens in chunks (:mod:`deskgen.generator.prompts`) with the
      active mix's text encoders, and record token counts, sampler and model revision per image;
    - activate a mix on the same pipeline (never a base reload) through its LoRA strategy
      (:mod:`deskgen.generator.adapters`); with ``fuse_active_mix`` (the default unless hot-swap slots
      are asked for) every mix is fused into the base weights while it is active and the pipeline holds
      no LoRA layer (compiled or not): a switch restores the exact base weights and adds the new mix in
      batched ops (:mod:`deskgen.generator.switching`); without it mixes are peft LoRA branches or
      hot-swap slots, and only ``fuse_hot_mix`` is fused (diffusers' ``fuse_lora`` for slots);
    - unload adapters the caller no longer wants (idempotent; the hot mix's adapters stay);
    - generate deterministically (same params + mix -> the same pixels) and attach the recipe,
      including the effective speed flags (``metadata["runtime"]``).

    One diffusers pipeline is not thread-safe and its LoRA state is shared by every call, so activating a
    mix and generating with it happen together under ``self.lock`` (an RLock: callers such as a Serve
    multiplexed loader may take it around several of these calls).

    Determinism: on a given device, dtype and settings, the same seed + mix gives the same bytes, also
    after switching away and back, and the base mix (or all weights 0) gives the bytes of a pipeline that
    never loaded a LoRA. Two documented exceptions: a fused mix is not bit-identical to the same mix
    unfused (the fused weight ``W + sum(s*B@A)`` is rounded once, the unfused path adds the branches
    to the layer output: another summation order; ``tests/unit/test_generator_speed.py`` and
    ``tests/unit/test_fused_switch.py`` bound the difference), and with ``compile`` the compiled UNet
    (other kernels, fused ops) is not bit-identical to the eager one, so there "base bit-for-bit" means
    the compiled base of the same replica. Hot-swap slots alone (``hotswap`` without ``compile``) change
    no bit on CPU fp32: the zero-padded rank and the 0-scale slots add exact zeros.
    """

    base_loads: ClassVar[int] = 0
    _base_loads_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        pipe: Any,
        registry: LoraRegistry,
        *,
        model_id: str,
        settings: GeneratorSettings,
        limits: SizeLimits = DEFAULT_SIZE_LIMITS,
        revision: str | None = None,
    ) -> None:
        """Wrap an already loaded (and :func:`optimise_pipeline`-d) pipeline; ``settings`` resolved
        (:meth:`GeneratorSettings.resolve`). Builds the LoRA strategy, converts to FP8, installs DeepCache
        and compiles the UNet (lazily: the first generation per shape compiles), as the settings say."""
        if not settings.is_resolved:
            raise ValueError("DeskGenerator needs resolved settings (GeneratorSettings.resolve())")
        self.pipe = pipe
        # Inference only: no parameter needs a gradient (what peft sets when it injects LoRA layers, and what
        # a compiled graph is traced with from the start, so loading adapters later changes no guard).
        for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, component, None)
            if model is not None:
                model.requires_grad_(False)
        self.registry = registry
        self.model_id = model_id
        self.runtime = settings
        self.device: str = settings.device or "cpu"
        self.dtype: str = settings.dtype or "float32"
        #: Bounds :meth:`generate` enforces when the caller sends none.
        self.limits = limits
        self.lock = threading.RLock()
        self._loaded: dict[str, str] = {}  # public adapter name -> peft adapter name
        self._mix = Mix(())  # the active mix: what generate() runs unless told otherwise
        self._in_sync = True  # whether the pipeline's LoRA layers currently compute self._mix
        self._hot = settings.hot_mix()
        #: Fuse every mix (``fuse_active_mix``), or only the hot mix.
        self._fuse_all = bool(settings.fuse_active_mix)
        #: Seconds the load-time warm-up took (None if there was none).
        self.warmup_s: float | None = None
        #: The model's revision (hub commit or a hash over its files, :func:`model_revision`), per image.
        self.revision = revision
        pipe.set_progress_bar_config(disable=True)
        apply_scheduler(pipe, settings.scheduler)
        #: The sampler as every image records it (name, class, key config).
        self.scheduler_record = describe_scheduler(settings.scheduler, pipe.scheduler)
        self.prompts = PromptEncoder(pipe)

        # Every LoRA file is checked before the strategy reads any (hot-swap slots read them all).
        timer = _Timer()
        # The verdicts are the registry's (one cache per file version), under its own lock, so that listing
        # adapters (a replica's ``info``) never waits for a generation.
        unavailable = self.check_adapters()
        log.info("checked %d LoRA files in %.3f s; unavailable: %s", len(registry.names()), timer.seconds(),
                 unavailable or "none")  # fmt: skip
        timer = _Timer()
        self.adapters: Strategy = build_strategy(
            pipe, registry, hotswap=bool(settings.hotswap), fuse_all=self._fuse_all, slots=settings.hotswap_slots,
            rank=settings.hotswap_rank, device=self.device, names=[n for n in registry.names() if n not in unavailable],
        )  # fmt: skip
        if isinstance(self.adapters, SlotAdapters):
            slots = self.adapters.slots
            self.runtime = dataclasses.replace(self.runtime, hotswap_rank=slots.rank)
            log.info("hotswap: %d LoRA slots of rank %d on %d UNet layers, built in %.2f s",
                     len(slots.names), slots.rank, len(slots.union), timer.seconds())  # fmt: skip
        #: The fused state: batched for peft adapters, diffusers' fuse_lora for hot-swap slots.
        method = "diffusers" if isinstance(self.adapters, SlotAdapters) else "batched"
        assert settings.fuse_backup is not None and settings.lora_factors is not None  # resolved, checked above
        self.switcher = MixSwitcher(pipe, self.adapters, backup=settings.fuse_backup, method=method,
                                    factors_on=settings.lora_factors)  # fmt: skip
        if self.switcher.by_residual and settings.compile_residual_codec:  # fused kernels, warmed at load
            self.switcher.batched.codec = residual.Codec(compiled=True)
        self.fp8_report: Fp8Report | None = None
        if settings.fp8:
            from deskgen.fp8 import quantize_unet_linears

            timer = _Timer()
            self.fp8_report = quantize_unet_linears(self.pipe.unet)
            log.info(
                "fp8: %d UNet linears (%.0f%% of its parameters) in float8_e4m3 in %.2f s, %.2f GB saved",
                self.fp8_report.layers, 100 * self.fp8_report.fraction, timer.seconds(), self.fp8_report.bytes_saved / 1e9,
            )  # fmt: skip
        self.deepcache: DeepCache | None = None
        if settings.deepcache_interval is not None:
            from deskgen.deepcache import DeepCache

            self.deepcache = DeepCache(self.pipe.unet, settings.deepcache_interval)
        if settings.compile:
            timer = _Timer()
            compile_unet(self.pipe.unet, settings.compile_mode, settings.compile_scope)
            log.info("UNet (%s) wrapped by torch.compile(mode=%r) in %.2f s",
                     settings.compile_scope, settings.compile_mode, timer.seconds())  # fmt: skip

    @property
    def active_mix_id(self) -> str:
        """Canonical id of the mix last activated (``"base"`` at first and after its adapters were unloaded)."""
        return self._mix.id

    @property
    def fused_mix_id(self) -> str | None:
        """Canonical id of the mix fused into the base weights right now, or None."""
        fused = self.switcher.fused
        return fused.mix.id if fused is not None else None

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
        dtype = runtime.dtype or "float32"
        variant = weights_variant(source, device=str(runtime.device), dtype=dtype, allowed=runtime.fp16_variant)
        pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=getattr(torch, dtype), variant=variant)
        pipe.to(runtime.device)
        optimise_pipeline(pipe, runtime)
        with cls._base_loads_lock:
            DeskGenerator.base_loads += 1
        revision = model_revision(source) + (f"+{variant}" if variant else "")
        gen = cls(pipe, registry, model_id=settings.model_id, settings=runtime, revision=revision)
        log.info("loaded %s in %.2f s with %s", settings.model_id, timer.seconds(), gen.describe())
        if gen.switcher.batched.codec.compiled:  # before any fuse: compiled now, not in the first switch
            timer = _Timer()
            gen.switcher.batched.codec.warm_up(pipe.unet.dtype, pipe.unet.device)
            log.info("residual codec compiled in %.2f s", timer.seconds())
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
        limits = SizeLimits(min_side=min(size, self.limits.min_side), max_side=max(size, self.limits.max_side))
        for mix in [Mix(()), *([self._hot] if self._hot is not None else [])]:
            self.generate(params, mix, limits=limits)
        self.warmup_s = timer.seconds()
        log.info("warm-up at %d px took %.1f s", size, self.warmup_s)
        return self.warmup_s

    def available_adapters(self) -> list[str]:
        """Adapters of the registry not known to be unusable (:attr:`unavailable`; not necessarily loaded
        yet). Never waits for a generation: a file added since the start is fully checked on first use."""
        unavailable = self.unavailable
        return [name for name in self.registry.names() if name not in unavailable]

    def check_adapters(self) -> dict[str, str]:
        """Check every file of the registry now (:meth:`adapter_problem`, once per file version) and return
        adapter -> why it cannot be loaded. Run at start, before the pipeline is shared; afterwards under
        :attr:`lock` (diffusers' loading helpers it uses are not thread-safe)."""
        found: dict[str, str] = {}
        for name in self.registry.names():
            problem = self.adapter_problem(name)
            if problem is not None:
                found[name] = problem
        return found

    @property
    def unavailable(self) -> dict[str, str]:
        """adapter -> reason, for the files of the registry known to be unusable: their header refused now
        (cheap, cached per file version), or refused by a full check of their current version."""
        return self.registry.unavailable()

    def adapter_problem(self, name: str) -> str | None:
        """Why adapter ``name`` cannot be loaded into this pipeline, or None: its header
        (:meth:`LoraRegistry.problem`: truncated, LyCORIS, DoRA, unknown layout), then its key mapping
        onto this model's modules (:func:`mapping_problem`). Both cached per file version by the registry;
        raises UnknownMix for a name the registry does not hold."""
        path = self.registry.path(name)
        try:
            path.stat()
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        known, problem = self.registry.recorded(name)
        if known:
            return problem
        problem = self.registry.problem(name)
        if problem is None:
            # Read once (tens of ms for a tiny file), then mapped and fitted from the same tensors.
            try:
                adapter = read_adapter(self.pipe, path)
            except Exception as exc:  # diffusers' own verdict: keys it cannot rename, a file it cannot read
                problem = unreadable_problem(exc)
            else:
                problem = mapping_problem(self.pipe, adapter, self.registry.module_count(name))
                if problem is None and hasattr(self, "adapters"):  # (the strategy is built after the first check)
                    problem = self.adapters.fit_problem(name, adapter)
            if problem is not None:
                log.warning("LoRA %s (%s) is unavailable: %s", name, path, problem)
        self.registry.record(name, problem)
        return problem

    def unchecked_adapters(self) -> list[str]:
        """Files of the registry whose current version has no verdict yet (added or changed since the last
        check; a refused header counts as a verdict). Never waits for a generation."""
        problems = self.registry.problems()
        return [n for n in self.registry.names() if n not in problems and not self.registry.recorded(n)[0]]

    def check_new_adapters(self) -> dict[str, str | None]:
        """Check every file :meth:`unchecked_adapters` lists (under :attr:`lock`: waits for the generation
        in progress) and return adapter -> its problem or None, so that a file that cannot be loaded is
        listed in :attr:`unavailable` before a request names it."""
        with self.lock:
            return {name: self.adapter_problem(name) for name in self.unchecked_adapters()}

    def loaded_adapters(self) -> set[str]:
        """Adapters currently held by the pipeline."""
        with self.lock:
            return set(self._loaded)

    def ensure_adapters(self, names: Iterable[str]) -> list[str]:
        """Load each adapter in ``names`` not loaded yet; returns those it loaded. An unknown name raises
        UnknownMix, an unusable file (:meth:`adapter_problem`) AdapterUnavailable, before any load; a file
        that fails to load or whose layers do not all match the model raises AdapterUnavailable, stays
        unloaded and is listed in :attr:`unavailable`."""
        import torch

        with self.lock:
            # Resolve and check every name first, so an unknown or unusable one fails before anything loads.
            paths = {name: self.registry.path(name) for name in names if name not in self._loaded}
            for name in paths:
                problem = self.adapter_problem(name)
                if problem is not None:
                    raise AdapterUnavailable.of(name, problem)
            if paths:
                # Never load into fused layers: restore the exact base first (re-fused on the next activate).
                self._unfuse()
            for name, path in paths.items():
                peft = peft_adapter_name(name)
                timer = _Timer()
                # Loading activates the new adapter in diffusers: the LoRA state no longer matches the
                # active mix, whether the load succeeds or not.
                self._in_sync = False
                try:
                    self.adapters.load(name, peft, path)
                    # With fuse_active_mix its factors are cached now (RuntimeError if it cannot be fused).
                    self.switcher.loaded(peft, cache=self._fuse_all)
                except Exception as exc:
                    # A load that fails half-way may leave layers injected: remove them, keep the error.
                    with contextlib.suppress(Exception):
                        self.switcher.deleted(peft)
                        self.adapters.delete(name, peft)
                    if isinstance(exc, (torch.OutOfMemoryError, DeskgenError)) or not isinstance(exc, (ValueError, KeyError, OSError, RuntimeError)):
                        raise  # the replica's trouble (memory) or already the caller's, not the file's
                    problem = f"it did not load ({type(exc).__name__}: {str(exc).strip()[:200]})"
                    self.registry.record(name, problem)
                    raise AdapterUnavailable.of(name, problem) from exc
                self._loaded[name] = peft
                self._check_loaded(name, peft, path)
                log.info("loaded LoRA %s (%s layout) in %.3f s", name, self.registry.layout(name), timer.seconds())
            return list(paths)

    def _check_loaded(self, name: str, peft: str, path: Path) -> None:
        # diffusers warns, but does not fail, when a LoRA's keys do not match the model (e.g. a kohya
        # name the conversion maps to a module that does not exist): count what really got weights.
        loaded = self.adapters.loaded_layers(name, peft)
        expected = self.registry.module_count(name)
        if loaded != expected:
            self._delete([name])
            problem = f"only {loaded} of its {expected} layers match this model; is it a LoRA for SDXL, and for this base model?"
            log.warning("LoRA %s (%s) is unavailable: %s", name, path, problem)
            self.registry.record(name, problem)
            raise AdapterUnavailable.of(name, problem)

    # -- mixes ----------------------------------------------------------------------------------

    def activate_mix(self, mix: Mix) -> float:
        """Make ``mix`` the pipeline's LoRA state; returns the seconds it took (0 if already active).

        Loads missing adapters first; the base mix disables every LoRA. Unknown adapter -> UnknownMix; in
        hotswap mode a mix with more adapters than ``hotswap_slots`` -> InvalidParameter. Every switch first
        restores the exact base weights; then the mix is fused (``fuse_active_mix``, or the hot mix) or
        applied as LoRA branches.
        """
        with self.lock:
            timer = _Timer()
            if self._in_sync and self._mix == mix:
                return 0.0
            self.adapters.check_mix(mix)
            self._unfuse()
            # Until the new mix is fully applied the LoRA state matches no mix: a failure below (a bad
            # file, a failed swap) leaves it marked so, and the next activation re-applies everything.
            self._in_sync = False
            self.ensure_adapters(mix.adapters)
            if mix.weights and (self._fuse_all or mix == self._hot):
                # The exact base values of every layer touched are kept first, to be restored by _unfuse.
                self.switcher.fuse(mix, self._loaded)
            elif not mix.weights and isinstance(self.adapters, PeftAdapters):
                self.switcher.branches_off()  # = adapters.apply(base), without walking every module
            else:
                self.adapters.apply(mix, self._loaded)
            self._mix = mix
            self._in_sync = True
            return timer.seconds()

    def _unfuse(self) -> None:
        self.switcher.unfuse()

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

    def _delete(self, names: list[str]) -> None:
        self._unfuse()  # never delete adapters from fused layers: restore the exact base first
        with warnings.catch_warnings():
            # peft: "Adapter X was active which is now deleted. Setting active adapter to Y." We re-apply below.
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for name in names:
                peft = self._loaded.pop(name)
                self.switcher.deleted(peft)
                self.adapters.delete(name, peft)
        # peft re-points its active adapters when one is deleted: re-apply the mix on the next activate.
        self._in_sync = False
        if set(self._mix.adapters) & set(names):
            # The active mix lost an adapter: fall back to the base mix now rather than keep half of it.
            self._mix = Mix(())
            self.adapters.apply(self._mix, self._loaded)
            self._in_sync = True

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self, params: GenerationParams, mix: Mix, on_step: StepCallback | None = None, *, limits: SizeLimits | None = None
    ) -> GenerationResult:
        """Draw one image of ``params`` with ``mix`` active, within ``limits`` (the caller's; default
        :attr:`limits`).

        Deterministic per device, dtype and settings: a ``torch.Generator`` seeded with ``params.seed``
        drives all noise. ``on_step(step, total)`` runs after each denoising step (1..total, in order)
        inside the lock, so it must be quick and must not call back into this generator from another thread.
        """
        import torch

        # 1. Validate (again: a caller may bypass the ingress).
        params.validate(limits or self.limits)
        with self.lock:
            # 2. Activate the mix on the one pipeline (fusing it if it is the hot mix).
            activate_s = self.activate_mix(mix)
            adapters = {name: self.registry.sha256(name) for name in mix.adapters}
            runtime = {**self.describe(), "fused": self.switcher.fused is not None}

            # 3. Denoise and decode. The last step's end splits the time into text encoding + denoising
            #    and VAE decoding (the callback changes nothing in the computation).
            denoised_at = [0.0]

            def step_end(pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                if on_step is not None:
                    on_step(step_index + 1, pipe.num_timesteps)
                denoised_at[0] = time.perf_counter()
                return callback_kwargs

            timer = _Timer()
            if self.deepcache is not None:
                self.deepcache.reset()
            # Prompts that fit in 77 tokens go to the pipeline as strings (its own path, bit for bit);
            # longer ones are embedded here in 77-token chunks, with the mix just activated.
            prompts = self.prompts.prepare(params.prompt, params.negative_prompt, device=self.device)
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
            with warnings.catch_warnings():
                # The pipeline's own __call__ casts a float16 VAE with force_upcast up through its deprecated
                # `upcast_vae` (what `vae_upcast` asks for; the decode is checked in the unit tests). The
                # FutureWarning is for callers of that method, which deskgen is not.
                warnings.filterwarnings("ignore", message="`upcast_vae` is deprecated", category=FutureWarning)
                output = self.pipe(
                    **prompts.pipe_kwargs,
                    num_inference_steps=params.steps,
                    guidance_scale=params.guidance,
                    width=params.width,
                    height=params.height,
                    generator=generator,
                    callback_on_step_end=step_end,
                    output_type="pil",
                )
            generate_s = timer.seconds()
            denoise_s = (denoised_at[0] - timer.start) if denoised_at[0] else generate_s

        # 4. Attach the recipe.
        metadata: dict[str, Any] = {
            **asdict(params),
            "mix_id": mix.id,
            "mix": mix.as_dict(),
            "adapters": adapters,
            "model_id": self.model_id,
            "model_revision": self.revision,
            "scheduler": self.scheduler_record,
            "prompt_tokens": prompts.prompt_tokens,
            "negative_prompt_tokens": prompts.negative_prompt_tokens,
            "prompt_chunks": prompts.chunks,
            "runtime": runtime,
            "timings": {"activate_s": round(activate_s, 6), "generate_s": round(generate_s, 6),
                        "denoise_s": round(denoise_s, 6), "decode_s": round(generate_s - denoise_s, 6)},
        }
        return GenerationResult(image=output.images[0], metadata=metadata)
