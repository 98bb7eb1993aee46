"""SDXL + LoRA mixes as a Ray Serve deployment: one full GPU, ONE base pipeline per replica.

Each LoRA mix is a multiplexed model id (its canonical id, see :mod:`deskgen.mixes`). What
``@serve.multiplexed`` caches per id is a :class:`LoadedMix` — a light handle whose adapters are
loaded into the replica's single pipeline — so Serve routes a mix's requests to replicas that
already hold it; the adapters no cached mix uses are dropped by the next load, but for the most recently
used few (:attr:`MixCache.keep_adapters` loaded in all; never the base, never an adapter the incoming mix
uses). How many of each a replica keeps is ``args.generator_cache`` (:class:`MixCache`).

:class:`GeneratorReplica` is the replica's logic without Ray (mix cache and release, one generation
at a time, events, health), unit-tested on the tiny model; :class:`Generator` is the thin Serve
wrapper that adds ``@serve.multiplexed`` routing and the replica's identity.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from deployments.logs import stamp_library_logs
from deployments.metrics import GeneratorMetrics, GeneratorObserver
from deployments.routing import ACTIVE_MIX, INFLIGHT
from deskgen.contracts import (
    GeneratedImage,
    GenerationEvent,
    GenerationRequest,
    Started,
    Step,
)
from deskgen.errors import DeskgenError
from deskgen.limits import UNHEALTHY_AFTER_FAILURES
from deskgen.mixes import BASE_MIX_ID, Mix, parse_mix_spec

if TYPE_CHECKING:
    from deskgen.generator import DeskGenerator, GeneratorSettings

log = logging.getLogger("ray.serve")

#: Seconds between two looks at the LoRA folder for files added or changed since the last check: a file
#: the replica cannot load is listed unavailable, with its reason, before a request names it.
ADAPTER_CHECK_S = 2.0


class MixCache(BaseModel):
    """How many mixes a Generator replica caches and how many adapters it keeps loaded:
    ``args.generator_cache`` in serve_config.yaml, checked when the application is built (a bad value fails
    the deploy naming its field). A change restarts the Generator replicas (a constructor argument)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mixes: int = Field(
        4, ge=1, le=64,
        description="mixes cached per replica (Serve's multiplexed LRU, what its routing sees). Adapters are small "
        "next to the base, so a handful fit easily; N replicas hold N x mixes without loading one again",
    )  # fmt: skip
    # Kept adapters: without them the colder A/B arm, whose adapter fewer of the other mixes share, read it
    # again after 3 of every 100 requests (0.7 s per file here): 22 ms of each request's queue wait, against
    # 4 ms for the control (BENCHMARKS.md, "Generator routing" 2026-12-06 20:14). As many as `mixes` by default:
    # that many cached mixes of one adapter each already hold that many, so the most memory adapters take is
    # unchanged. (A `mixes` that failed validation is not in `data`; the error is reported for it.)
    keep_adapters: int = Field(
        default_factory=lambda data: data.get("mixes", 0), ge=0, le=256,
        description="loaded adapters a replica keeps in all although no cached mix uses them, the most recently "
        "used first (default or null: as many as `mixes`), so a mix back after its eviction reads no adapter file",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _null_keeps_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "keep_adapters" in data and data["keep_adapters"] is None:
            data = {key: value for key, value in data.items() if key != "keep_adapters"}
        return data


#: What a replica keeps when nothing is configured (and what the benches' models of a replica assume).
DEFAULT_CACHE = MixCache()
#: A replica's mix-load counters, in :meth:`GeneratorReplica.info` (in all and by mix label).
LOAD_COUNTERS = ("mix_loads", "mix_load_s", "adapter_loads", "adapter_load_s")


def kept_adapters(spare: set[str], needed: set[str], last_used: Mapping[str, int], limit: int) -> set[str]:
    """Of the loaded adapters in ``spare`` (no cached mix nor the incoming one uses them; their file is the
    version loaded), those a load keeps: the most recently used, while the adapters kept and ``needed`` number
    at most ``limit`` (:attr:`MixCache.keep_adapters`)."""
    room = limit - len(needed)
    recent = sorted(spare - needed, key=lambda name: (last_used.get(name, 0), name), reverse=True)
    return set(recent[: max(room, 0)])


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

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self)

    def __del__(self) -> None:
        self.release()


class GeneratorReplica:
    """One replica's generation logic, Ray-free: a :class:`DeskGenerator`, the mixes cached for it,
    one generation at a time (the mix load happens inside the same lock, so a mix can never be evicted
    while another request of this replica is using it), events as typed values."""

    def __init__(self, generator: DeskGenerator, replica_id: Callable[[], str] = lambda: "local",
                 observer: GeneratorObserver | None = None, cache: MixCache = DEFAULT_CACHE) -> None:  # fmt: skip
        self.generator = generator
        #: How many mixes Serve's LRU caches for this replica (the Serve wrapper sizes it) and how many loaded
        #: adapters no cached mix uses a load keeps (:func:`kept_adapters`).
        self.cache = cache
        self.replica_id = replica_id
        self.observer = observer or GeneratorObserver()
        self.lock = asyncio.Lock()
        self.cached: dict[str, Mix] = {}
        #: The metrics label each cached mix was requested under (for its eviction).
        self.labels: dict[str, str] = {}
        self.inflight = 0
        #: The most requests in flight at once since the last :meth:`routing_stats` (what it reports).
        self.inflight_peak = 0
        #: Mix loads by the label each was requested under (a named mix, or "adhoc"), LOAD_COUNTERS each: the
        #: loads; the seconds they took (trim, reads, bookkeeping); the adapter files they read (a mix whose
        #: adapters are all loaded already reads none) and the seconds spent reading them (what the router
        #: benches' model calls an adapter load's cost). By label, so an arm's queue wait can be attributed.
        self.loads_by_label: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict.fromkeys(LOAD_COUNTERS, 0))
        #: Each adapter's last use (a load or a generation of a mix with it), as a count of :attr:`uses`.
        self.last_used: dict[str, int] = {}
        self.uses = 0
        #: Generations that found another mix active (the pipeline's mix changed for them).
        self.switches = 0
        self.generations = 0
        self.failures_in_a_row = 0
        self.last_failure: str | None = None
        #: Requests waiting for the pipeline, by mix label; the label of the mix that ran last.
        self.waiting: collections.Counter[str] = collections.Counter()
        self.active_label: str | None = None
        #: The one thread that touches the pipeline (loads, generations, unloads). With a pool of threads
        #: each allocation lands in the glibc arena of whichever thread ran it, and memory freed in one
        #: arena is not reused by the others: the resident set crept up under mix churn (BENCHMARKS.md,
        #: "Memory under mix churn"). One thread costs nothing: the pipeline runs one thing at a time.
        self.pipeline_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="pipeline", initializer=self._thread_started, initargs=("pipeline",))
        #: The OS thread id (as /proc/<pid>/task/<tid> and ``top -H`` show it) of each thread the replica's own
        #: work runs on: the pipeline's, the event loop its request code runs on ("requests": waiting, PNG
        #: encoding, events) and the adapter watch's. Serve's and Ray's threads in the process are the others
        #: (bench.router splits the replica's CPU time this way).
        self.threads: dict[str, int] = {}

    def _thread_started(self, role: str) -> None:
        self.threads[role] = threading.get_native_id()

    def _in_pipeline_thread(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Run ``fn`` on :attr:`pipeline_thread`, with the caller's context variables (the request's log
        stamp, as ``asyncio.to_thread`` would carry them)."""
        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(
            self.pipeline_thread, functools.partial(context.run, fn, *args, **kwargs)
        )

    async def load_mix(self, mix_id: str, label: str = "adhoc") -> LoadedMix:
        """Load the adapters of ``mix_id`` not loaded (what ``@serve.multiplexed`` calls on a cache miss), after
        dropping the adapters that neither a cached mix nor this one uses, but for those :func:`kept_adapters`
        keeps (what evictions left behind: see :meth:`release`)."""
        mix = mix_from_id(mix_id)
        started = time.perf_counter()
        # A snapshot first: a LoadedMix collected meanwhile runs :meth:`release`, which pops from the dict
        # (``tuple`` copies it in one C call; a comprehension over the live view could see it change size).
        needed = {name for cached in tuple(self.cached.values()) for name in cached.adapters} | set(mix.adapters)
        self._used(mix)
        read, read_s = await self._in_pipeline_thread(self._trim_and_load, needed, dict(self.last_used), mix.adapters)
        self.cached[mix.id] = mix
        self.labels[mix.id] = label
        seconds = time.perf_counter() - started
        for key, value in zip(LOAD_COUNTERS, (1, seconds, read, read_s), strict=True):
            self.loads_by_label[label][key] += value
        self.observer.loaded(label, seconds)
        return LoadedMix(mix, self.release)

    def load_total(self, key: str) -> float:
        """One of LOAD_COUNTERS over every label."""
        return sum(counts[key] for counts in self.loads_by_label.values())

    def _used(self, mix: Mix) -> None:
        self.uses += 1
        for name in mix.adapters:
            self.last_used[name] = self.uses

    def _trim_and_load(self, needed: set[str], last_used: dict[str, int], adapters: tuple[str, ...]) -> tuple[int, float]:
        """Drop the loaded adapters neither ``needed`` nor kept (:func:`kept_adapters`), load those of
        ``adapters`` not loaded; returns how many it loaded and the seconds that took (0 when none was missing)."""
        registry = self.generator.registry
        spare = {name for name in self.generator.loaded_adapters() - needed if registry.recorded(name) == (True, None)}
        dropped = self.generator.unload_adapters(needed | kept_adapters(spare, needed, last_used, self.cache.keep_adapters))
        if dropped:
            log.info("dropped adapters %s: no cached mix uses them", dropped)
        started = time.perf_counter()
        read = self.generator.ensure_adapters(adapters)
        return len(read), (time.perf_counter() - started if read else 0.0)

    def release(self, loaded: LoadedMix) -> None:
        """A mix left the cache. Its adapters that no other cached mix uses may be dropped by the next load
        (:func:`kept_adapters`), not now: Serve evicts the least recently used mix *before* it loads the mix
        that needs the room, so an unload here would also drop the incoming mix's adapters that only the
        evicted one used, to be loaded again at once (an adapter load costs seconds; BENCHMARKS.md "Generator
        routing, simulated"). Serve evicts only to make room for a load (or when the replica stops)."""
        self.cached.pop(loaded.mix.id, None)
        self.observer.evicted(self.labels.pop(loaded.mix.id, "adhoc"))

    def _start(
        self, request: GenerationRequest, mix: Mix, cancel: threading.Event,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Run the generation in a worker thread. Each step checks ``cancel`` (set when the caller went
        away: the generation stops at its next step) and reports to ``on_progress``."""

        def on_step(step: int, total: int) -> None:
            if cancel.is_set():
                raise GenerationCancelled
            if on_progress is not None:
                on_progress(step, total)

        self._used(mix)
        switched = self.generator.active_mix_id != mix.id
        self.switches += switched
        self.observer.activated(request.mix_label, switched=switched)
        self.observer.active(request.mix_label, self.active_label)
        self.active_label = request.mix_label
        return self._in_pipeline_thread(self.generator.generate, request.params, mix, on_step, limits=request.limits)

    async def stream(
        self, request: GenerationRequest, get_mix: Callable[[], Awaitable[LoadedMix]]
    ) -> AsyncIterator[GenerationEvent]:
        """Started (mix active on this replica), one step per denoising step, then the image. ``get_mix``
        loads (or finds cached) the mix, inside the replica's lock."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Step] = asyncio.Queue()
        cancel = threading.Event()

        def relay(step: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, Step(step=step, total=total))

        queued_at = time.perf_counter()
        async with self._turn(request, queued_at):
            try:
                loaded = await get_mix()
                yield Started(mix_id=loaded.mix.id, replica=self.replica_id(),
                                        queued_s=time.perf_counter() - queued_at)  # fmt: skip
                work = self._start(request, loaded.mix, cancel, relay)
                while not work.done():
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield self._image(request, self._result(work))
            finally:
                cancel.set()

    @contextlib.asynccontextmanager
    async def _turn(self, request: GenerationRequest, queued_at: float) -> AsyncIterator[None]:
        """The replica's one pipeline, in arrival order; reports the wait, the requests waiting per mix and in
        flight, and a request whose caller left (cancelled while waiting or generating, or a stream closed
        early)."""
        if "requests" not in self.threads:
            self._thread_started("requests")
        self.inflight += 1
        self.inflight_peak = max(self.inflight_peak, self.inflight)
        self.observer.inflight(self.inflight)
        label = request.mix_label
        self._wait(label, +1)
        waiting = True
        try:
            async with self.lock:
                self._wait(label, -1)
                waiting = False
                self.observer.queued(label, time.perf_counter() - queued_at)
                yield
        except (asyncio.CancelledError, GeneratorExit, GenerationCancelled):
            self.observer.cancelled(label)
            raise
        finally:
            if waiting:
                self._wait(label, -1)
            self.inflight -= 1
            self.observer.inflight(self.inflight)

    def _wait(self, label: str, change: int) -> None:
        self.waiting[label] += change
        self.observer.waiting(label, self.waiting[label])
        if self.waiting[label] <= 0:
            del self.waiting[label]

    def _result(self, work: asyncio.Future[Any]) -> Any:
        try:
            result = work.result()
        except (DeskgenError, GenerationCancelled):
            raise  # the request's fault, or its caller left: the replica is fine
        except Exception as exc:
            self.failures_in_a_row += 1
            self.last_failure = f"{type(exc).__name__}: {exc}"
            raise
        self.failures_in_a_row = 0
        self.generations += 1
        return result

    def routing_stats(self) -> dict[str, Any]:
        """What the mix-aware router reads (deployments/routing.py; Serve asks every stats period): the active
        mix, the waiting requests, and under ``inflight`` the most requests in flight at once since the
        previous call (then reset to those in flight now). A snapshot would often be taken in the gap
        between two requests of a busy replica and report it idle for a whole period."""
        peak, self.inflight_peak = self.inflight_peak, self.inflight
        return {ACTIVE_MIX: self.generator.active_mix_id, INFLIGHT: peak, "waiting": dict(self.waiting)}

    async def generate(self, request: GenerationRequest, get_mix: Callable[[], Awaitable[LoadedMix]]) -> GeneratedImage:
        """The image alone: the same generation as :meth:`stream` without relaying step events."""
        cancel = threading.Event()
        async with self._turn(request, time.perf_counter()):
            try:
                loaded = await get_mix()
                work = self._start(request, loaded.mix, cancel)
                await asyncio.wait({work})
                return self._image(request, self._result(work))
            finally:
                cancel.set()

    def _image(self, request: GenerationRequest, result: Any) -> GeneratedImage:
        replica = self.replica_id()
        started = time.perf_counter()
        # Timings stay out of the PNG so the same seed + mix gives the same bytes.
        png = result.png(timings=False)
        self.observer.generated(request.mix_label, {**result.metadata["timings"], "png_s": time.perf_counter() - started})
        return GeneratedImage(
            png=png,
            params=request.params,
            metadata=dict(result.metadata, replica=replica),
            replica=replica,
        )

    def watch_adapters(self, stop: threading.Event, interval_s: float = ADAPTER_CHECK_S) -> None:
        """Until ``stop`` is set, check every ``interval_s`` the LoRA files added or changed since the last
        check (:meth:`DeskGenerator.check_new_adapters`, which waits for the generation in progress). Runs
        in a background thread of its own."""
        self._thread_started("adapter watch")
        while not stop.wait(interval_s):
            try:
                if self.generator.unchecked_adapters():
                    checked = self.generator.check_new_adapters()
                    log.info("checked new LoRA files: %s", {n: p or "usable" for n, p in checked.items()})
            except Exception:  # a bad look at the folder must not end the watch
                log.exception("checking new LoRA files failed")

    def check_health(self) -> None:
        """Raise if the replica should be replaced: unexpected failures kept coming."""
        if self.failures_in_a_row >= UNHEALTHY_AFTER_FAILURES:
            raise RuntimeError(
                f"{self.failures_in_a_row} generations in a row failed unexpectedly; last: {self.last_failure}"
            )

    def info(self) -> dict[str, Any]:
        """Adapters, cached mixes and load counters of this replica (tests and ops read it)."""
        return {
            "replica": self.replica_id(),
            "pid": os.getpid(),
            "model_id": self.generator.model_id,
            "adapters": self.generator.available_adapters(),
            #: LoRA files present but unusable (checked at start, a file added later on first use), with the reason.
            "unavailable": self.generator.unavailable,
            "loaded_adapters": sorted(self.generator.loaded_adapters()),
            "cached_mixes": sorted(self.cached),
            "cache": self.cache.model_dump(),
            "active_mix": self.generator.active_mix_id,
            "base_loads": type(self.generator).base_loads,
            **{key: round(self.load_total(key), 6) for key in LOAD_COUNTERS},
            "loads_by_label": {
                label: {key: round(v, 6) for key, v in counts.items()} for label, counts in self.loads_by_label.items()
            },
            "switches": self.switches,
            "generations": self.generations,
            "threads": dict(self.threads),
        }


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=4)
class Generator:
    """Generates images with the replica's one pipeline, one generation at a time. ``generator``
    injects an already loaded :class:`DeskGenerator` (tests); otherwise ``settings`` load one."""

    def __init__(self, settings: GeneratorSettings, *, cache: MixCache = DEFAULT_CACHE,
                 generator: DeskGenerator | None = None) -> None:  # fmt: skip
        stamp_library_logs()
        if generator is None:
            from deskgen.generator import DeskGenerator

            generator = DeskGenerator.from_pretrained(settings)
        observer = GeneratorMetrics()
        observer.base_loaded()
        self.replica = GeneratorReplica(generator, _replica_id, observer, cache)
        #: The label of the request whose mix is being loaded (``_load_mix`` takes only the id).
        self._loading_label = "adhoc"
        # Serve's multiplexed LRU, sized by the configuration, so applied here and not at class definition.
        # Bound to this instance under the loader's own name, Serve keeps the cache on the replica (and
        # shuts it down with it) as it does for a decorated method.
        self._load_mix = serve.multiplexed(max_num_models_per_replica=cache.mixes)(_load_mix)
        # New LoRA files are checked in the background, so /v1/mixes lists one this replica cannot hold
        # (e.g. wider than its hot-swap slots) before any request names it.
        self._stop_watch = threading.Event()
        threading.Thread(target=self.replica.watch_adapters, args=(self._stop_watch,), name="lora-watch",
                         daemon=True).start()  # fmt: skip

    def _get_mix(self, request: GenerationRequest) -> Callable[[], Awaitable[LoadedMix]]:
        def get() -> Awaitable[LoadedMix]:
            # Called inside the replica's lock: one mix load at a time, so the label cannot be mixed up.
            self._loading_label = request.mix_label
            return self._load_mix(self, serve.get_multiplexed_model_id() or BASE_MIX_ID)  # type: ignore[no-any-return]

        return get

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Events of one generation; the mix comes from the multiplexed model id."""
        async for event in self.replica.stream(request, self._get_mix(request)):
            yield event

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        """The image alone (no step events cross the process boundary)."""
        return await self.replica.generate(request, self._get_mix(request))

    def info(self) -> dict[str, Any]:
        return self.replica.info()

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve calls this every ``request_routing_stats_period_s``; the mix-aware router reads it."""
        return self.replica.routing_stats()

    def check_health(self) -> None:
        self.replica.check_health()

    def ping(self) -> str:
        return "ok"


async def _load_mix(generator: Generator, mix_id: str) -> LoadedMix:
    """What Serve's multiplexed LRU calls on a miss (:meth:`GeneratorReplica.load_mix`). Serve finds the
    instance it caches for by this function's name (``generator._load_mix`` must be its wrapper)."""
    return await generator.replica.load_mix(mix_id, generator._loading_label)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return "local"
