"""SDXL + LoRA mixes as a Ray Serve deployment: one full GPU, ONE base pipeline per replica.

Each LoRA mix is a multiplexed model id (its canonical id, see :mod:`deskgen.mixes`). What
``@serve.multiplexed`` caches per id is a :class:`LoadedMix` — a light handle whose adapters are
loaded into the replica's single pipeline — so Serve routes a mix's requests to replicas that
already hold it, and evicting a mix drops only adapters no other cached mix uses, never the base.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from deskgen.generator import GenerationParams, settings_from_options
from deskgen.mixes import BASE_MIX_ID, Mix, parse_mix_spec

log = logging.getLogger("ray.serve")

#: Mixes cached per replica (LRU). Adapters are small next to the base, so a handful fit easily.
MAX_CACHED_MIXES = 4


class GenerationCancelled(Exception):
    """Raised from the step callback to stop a generation whose caller went away."""


def mix_from_id(mix_id: str) -> Mix:
    """The :class:`Mix` a canonical id (or ``base``, or an empty id) stands for."""
    if mix_id in ("", BASE_MIX_ID):
        return Mix(())
    return Mix.from_weights(parse_mix_spec(mix_id, field="mix"))


class LoadedMix:
    """A cached mix. Releasing it (Serve's LRU eviction calls ``__del__``, and later the GC does
    again) tells the replica once that its adapters may go."""

    def __init__(self, mix: Mix, release: Callable[[LoadedMix], None]) -> None:
        self.mix = mix
        self._release = release
        self._released = False

    def __del__(self) -> None:
        if not self._released:
            self._released = True
            self._release(self)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class Generator:
    """Generates images with the replica's one pipeline, one generation at a time."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from deskgen.generator import DeskGenerator

        self.generator = DeskGenerator.from_pretrained(settings_from_options(settings))
        # One generation at a time, and the multiplexed loader runs inside the same lock: a mix
        # can never be evicted while another request of this replica is using it.
        self._lock = asyncio.Lock()
        self._cached: dict[str, Mix] = {}
        self.mix_loads = 0
        self.generations = 0

    @serve.multiplexed(max_num_models_per_replica=MAX_CACHED_MIXES)
    async def get_mix(self, mix_id: str) -> LoadedMix:
        mix = mix_from_id(mix_id)
        await asyncio.to_thread(self.generator.ensure_adapters, mix.adapters)
        self._cached[mix.id] = mix
        self.mix_loads += 1
        return LoadedMix(mix, self._release)

    def _release(self, loaded: LoadedMix) -> None:
        self._cached.pop(loaded.mix.id, None)
        keep = {name for mix in self._cached.values() for name in mix.adapters}
        dropped = self.generator.unload_adapters(keep)
        log.info("evicted mix %s; dropped adapters %s", loaded.mix.id, dropped)

    async def generate_stream(self, params: GenerationParams) -> AsyncIterator[dict[str, Any]]:
        """Events: ``started`` (mix active on this replica), one ``step`` per denoising step, then
        ``done`` with the PNG bytes and metadata. The mix comes from the multiplexed model id."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def on_step(step: int, total: int) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            loop.call_soon_threadsafe(events.put_nowait, {"event": "step", "step": step, "total": total})

        queued_at = time.perf_counter()
        async with self._lock:
            try:
                # 1. Load (or find cached) the mix inside the lock.
                loaded = await self.get_mix(serve.get_multiplexed_model_id() or BASE_MIX_ID)
                yield {"event": "started", "mix_id": loaded.mix.id, "replica": _replica_id(),
                       "queued_s": time.perf_counter() - queued_at}
                # 2. Generate in a worker thread; relay its step events as they come.
                work = asyncio.ensure_future(
                    asyncio.to_thread(self.generator.generate, params, loaded.mix, on_step)
                )
                while not work.done():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                result = work.result()
                self.generations += 1
                metadata = dict(result.metadata, replica=_replica_id())
                # Timings stay out of the PNG so the same seed + mix gives the same bytes.
                yield {"event": "done", "png": result.png(timings=False), "metadata": metadata}
            finally:
                # The caller went away (timeout, disconnect): stop at the next step.
                cancel.set()

    async def generate(self, params: GenerationParams) -> dict[str, Any]:
        """``{"png": bytes, "metadata": dict}`` for one image."""
        async for event in self.generate_stream(params):
            if event["event"] == "done":
                return {"png": event["png"], "metadata": event["metadata"]}
        raise RuntimeError("generation ended without a result")

    def info(self) -> dict[str, Any]:
        """Adapters, cached mixes and load counters of this replica (tests and /v1/mixes read it)."""
        return {
            "replica": _replica_id(),
            "model_id": self.generator.model_id,
            "adapters": self.generator.available_adapters(),
            "loaded_adapters": sorted(self.generator.loaded_adapters()),
            "cached_mixes": sorted(self._cached),
            "active_mix": self.generator.active_mix_id,
            "base_loads": type(self.generator).base_loads,
            "mix_loads": self.mix_loads,
            "generations": self.generations,
        }

    def ping(self) -> str:
        return "ok"


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return "local"
