"""The deployments' own logic without Ray: models injected (the real tiny ones), methods called directly.

Serve adds routing, ``@serve.multiplexed``'s LRU and process boundaries on top; here: which adapters a
mix eviction releases, the typed events of a generation, the limits a request carries, health checks,
batching and ``reconfigure`` of the CPU stages.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.captioner import Captioner as CaptionerDeployment
from deployments.classifier import Classifier as ClassifierDeployment
from deployments.generator import DEFAULT_CACHE, GeneratorReplica, LoadedMix, MixCache, kept_adapters
from deployments.metrics import GeneratorObserver
from deskgen.contracts import (
    CaptionResult,
    GateVerdict,
    GeneratedImage,
    GenerationRequest,
    Started,
    Step,
)
from deskgen.errors import InvalidParameter
from deskgen.generator import DeskGenerator, GenerationParams
from deskgen.limits import UNHEALTHY_AFTER_FAILURES, SizeLimits
from deskgen.mixes import NAMED_MIXES, Mix
from deskgen.pngmeta import read_png_metadata
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def mix_id(name: str) -> str:
    return Mix.from_weights(NAMED_MIXES[name]).id


@pytest.fixture()
def replica(tiny_models: Path) -> GeneratorReplica:
    return GeneratorReplica(DeskGenerator.from_pretrained(settings_for(tiny_models)), replica_id=lambda: "r1")


# -- Generator: the mix cache and what its eviction releases --------------------------------------


def test_an_evicted_mix_s_adapters_go_at_the_next_load_except_those_the_loaded_mix_uses(
    replica: GeneratorReplica,
) -> None:
    """Serve evicts the least recently used mix, then loads the mix that needs the room. The adapters only the
    evicted mix used are dropped by that load (none kept beyond the cached mixes' here), except those the
    incoming mix uses: those are never dropped and loaded again at once (what an unload at the eviction did)."""
    replica.cache = MixCache(keep_adapters=0)
    loads: list[str] = []
    strategy = replica.generator.adapters
    original = strategy.load

    def counting(public: str, peft: str, path: Path) -> None:
        loads.append(public)
        original(public, peft, path)

    strategy.load = counting  # type: ignore[method-assign]

    async def scenario() -> None:
        a = await replica.load_mix(mix_id("dalle_ott"))  # dalle + ott
        b = await replica.load_mix(mix_id("ott_3d"))  # ott + 3d
        assert replica.generator.loaded_adapters() == {"dalle", "ott", "3d"} and sorted(loads) == ["3d", "dalle", "ott"]
        a.release()  # what Serve's LRU does on eviction (through __del__), before it loads the next mix
        assert sorted(replica.cached) == [b.mix.id]
        c = await replica.load_mix(mix_id("dalle_3d"))  # dalle: only the evicted mix used it, and this one does
        assert replica.generator.loaded_adapters() == {"dalle", "ott", "3d"} and len(loads) == 3  # kept, not reloaded
        b.release()
        d = await replica.load_mix(mix_id("3d_only"))
        assert replica.generator.loaded_adapters() == {"dalle", "3d"}  # ott: neither dalle_3d nor 3d_only uses it
        c.release()
        d.release()
        assert replica.cached == {}
        await replica.load_mix(mix_id("ott_only"))
        assert replica.generator.loaded_adapters() == {"ott"} and loads[3:] == ["ott"]
        assert replica.load_total("mix_loads") == 5 and replica.load_total("adapter_loads") == len(loads) == 4  # files read, as the strategy saw
        info = replica.info()
        assert info["adapter_loads"] == 4 and 0 < info["adapter_load_s"] <= info["mix_load_s"]

    asyncio.run(scenario())


def test_load_counters_are_kept_by_the_label_each_load_was_requested_under(
    replica: GeneratorReplica,
) -> None:
    """Which mixes' loads read adapter files: an A/B arm whose adapter the other cached mixes do not use is
    read again after an eviction (none kept beyond the cached mixes' here); the router bench attributes the
    arm's queue wait with these counters."""
    replica.cache = MixCache(keep_adapters=0)

    async def scenario() -> None:
        first = await replica.load_mix(mix_id("dalle_ott"), "dalle_ott")  # reads dalle and ott
        await replica.load_mix(mix_id("ott_3d"), "ott_3d")  # reads 3d
        first.release()
        await replica.load_mix(Mix.from_weights({"ott": 0.3}).id)  # ad hoc; drops dalle (no cached mix uses it), reads none
        await replica.load_mix(mix_id("dalle_ott"), "dalle_ott")  # reads dalle again

    asyncio.run(scenario())
    info = replica.info()
    by_label = info["loads_by_label"]
    assert {label: (c["mix_loads"], c["adapter_loads"]) for label, c in by_label.items()} == {
        "dalle_ott": (2, 3), "ott_3d": (1, 1), "adhoc": (1, 0)}  # fmt: skip
    assert by_label["adhoc"]["adapter_load_s"] == 0 < by_label["dalle_ott"]["adapter_load_s"] <= by_label["dalle_ott"]["mix_load_s"]


def test_the_most_recently_used_adapters_no_cached_mix_uses_are_kept_up_to_the_limit() -> None:
    limit = DEFAULT_CACHE.keep_adapters
    spare = {f"a{i}" for i in range(limit + 2)}
    last_used = {f"a{i}": i for i in range(limit + 2)}  # a0 the least recently used
    assert kept_adapters(spare, set(), last_used, limit) == {f"a{i}" for i in range(2, limit + 2)}
    # The adapters needed count against the limit; one needed is never counted as spare.
    by_recency = sorted((name for name in spare if name != "a5"), key=lambda name: -last_used[name])
    assert kept_adapters(spare, {"x", "a5"}, last_used, limit) == set(by_recency[: limit - 2])
    assert kept_adapters(spare, {f"n{i}" for i in range(limit + 1)}, last_used, limit) == set()  # no room left
    assert kept_adapters({"b", "c"}, set(), {}, limit) == {"b", "c"}  # never used since the start: kept while there is room


def test_an_evicted_mix_comes_back_without_reading_its_adapters_again(tiny_models: Path, tmp_path: Path) -> None:
    """The colder A/B arm's adapter (dalle: no other cached mix uses it after its mix's eviction) stays
    loaded, so its mix's next load reads no file; a file changed since it was loaded is not kept."""
    shutil.copytree(tiny_models / "loras", tmp_path / "loras")
    generator = DeskGenerator.from_pretrained(settings_for(tiny_models, tmp_path / "loras"))
    replica = GeneratorReplica(generator, replica_id=lambda: "r1")
    assert replica.cache == DEFAULT_CACHE and replica.cache.keep_adapters >= 3  # the tiny models' three adapters all fit

    async def scenario() -> None:
        arm = await replica.load_mix(mix_id("dalle_ott"), "dalle_ott")
        await replica.load_mix(mix_id("ott_3d"), "ott_3d")
        arm.release()
        await replica.load_mix(Mix.from_weights({"ott": 0.3}).id)  # no cached mix uses dalle now: kept
        assert replica.generator.loaded_adapters() == {"dalle", "ott", "3d"}
        again = await replica.load_mix(mix_id("dalle_ott"), "dalle_ott")
        assert replica.info()["loads_by_label"]["dalle_ott"]["adapter_loads"] == 2  # its first load only
        again.release()
        path = replica.generator.registry.path("dalle")
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new version of the file
        await replica.load_mix(mix_id("3d_only"))
        assert replica.generator.loaded_adapters() == {"ott", "3d"}  # the old version of dalle is not kept
        # A kept adapter whose file is removed: dropped by the next load, which is served.
        (tmp_path / "loras" / "ott.safetensors").unlink()
        await replica.load_mix(Mix.from_weights({"3d": 0.9}).id)
        assert replica.generator.loaded_adapters() == {"3d"}

    asyncio.run(scenario())


def test_a_loaded_mix_releases_once_also_when_collected(replica: GeneratorReplica) -> None:
    released: list[str] = []

    async def scenario() -> None:
        loaded = await replica.load_mix(mix_id("dalle_only"))
        first = LoadedMix(loaded.mix, lambda m: released.append(m.mix.id))
        first.release()
        del first  # __del__ after an explicit release (Serve's eviction, then the GC): no second release
        gc.collect()
        second = LoadedMix(loaded.mix, lambda m: released.append(m.mix.id))
        del second  # collected without an explicit release: released once by __del__
        gc.collect()

    asyncio.run(scenario())
    assert released == [mix_id("dalle_only")] * 2


# -- Generator: typed events, limits from the request, health ------------------------------------


def test_a_generation_streams_started_steps_and_the_image(replica: GeneratorReplica) -> None:
    request = GenerationRequest(params=PARAMS)
    mix = mix_id("mix")

    async def scenario() -> tuple[list[object], GeneratedImage]:
        events = [e async for e in replica.stream(request, lambda: replica.load_mix(mix))]
        unary = await replica.generate(request, lambda: replica.load_mix(mix))
        return events, unary

    events, unary = asyncio.run(scenario())
    started, *steps, done = events
    assert isinstance(started, Started) and started.mix_id == mix and started.replica == "r1"
    assert [(s.step, s.total) for s in steps if isinstance(s, Step)] == [(i, PARAMS.steps) for i in range(1, PARAMS.steps + 1)]
    assert isinstance(done, GeneratedImage) and done.params == PARAMS and done.replica == "r1"
    assert done.png == unary.png  # the unary path draws the same image, without relaying steps
    recipe = read_png_metadata(done.png)
    assert recipe["mix_id"] == mix and recipe["seed"] == PARAMS.seed and "timings" not in recipe
    assert done.metadata["replica"] == "r1" and "timings" in done.metadata
    assert replica.generations == 2


class Recorded(GeneratorObserver):
    """Keeps every event (the Serve deployment's observer exports them as metrics)."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def queued(self, mix: str, seconds: float) -> None:
        self.events.append(("queued", mix))

    def inflight(self, n: int) -> None:
        self.events.append(("inflight", n))

    def loaded(self, mix: str, seconds: float) -> None:
        self.events.append(("loaded", mix))

    def evicted(self, mix: str) -> None:
        self.events.append(("evicted", mix))

    def activated(self, mix: str, switched: bool) -> None:
        self.events.append(("activated", mix, switched))

    def generated(self, mix: str, timings: Mapping[str, float]) -> None:
        self.events.append(("generated", mix, tuple(sorted(timings))))

    def cancelled(self, mix: str) -> None:
        self.events.append(("cancelled", mix))


def test_the_replica_reports_loads_switches_stages_and_evictions_per_mix(tiny_models: Path) -> None:
    seen = Recorded()
    replica = GeneratorReplica(DeskGenerator.from_pretrained(settings_for(tiny_models)), observer=seen)
    a, b = mix_id("dalle_only"), mix_id("ott_only")

    async def scenario() -> None:
        cached: dict[str, LoadedMix] = {}

        async def get(mix: str, label: str) -> LoadedMix:
            if mix not in cached:
                cached[mix] = await replica.load_mix(mix, label)
            return cached[mix]

        for mix, label in ((a, "dalle_only"), (b, "ott_only"), (b, "ott_only"), (a, "dalle_only")):
            await replica.generate(GenerationRequest(PARAMS, mix_label=label), lambda m=mix, lb=label: get(m, lb))  # type: ignore[misc]
        cached.pop(b).release()  # the LRU evicts it

    asyncio.run(scenario())
    kinds = [e for e in seen.events if e[0] != "inflight"]
    assert [e for e in kinds if e[0] == "loaded"] == [("loaded", "dalle_only"), ("loaded", "ott_only")]
    assert [e for e in kinds if e[0] == "activated"] == [
        ("activated", "dalle_only", True), ("activated", "ott_only", True),
        ("activated", "ott_only", False), ("activated", "dalle_only", True),
    ]  # fmt: skip
    stages = ("activate_s", "decode_s", "denoise_s", "generate_s", "png_s")
    assert [e for e in kinds if e[0] == "generated"] == [("generated", m, stages) for m in ("dalle_only", "ott_only", "ott_only", "dalle_only")]
    # ott_only by the LRU; then dalle_only, when the last handle on it goes (Serve's cache dropping it).
    assert [e for e in kinds if e[0] == "evicted"] == [("evicted", "ott_only"), ("evicted", "dalle_only")]
    assert [e[1] for e in seen.events if e[0] == "inflight"] == [1, 0] * 4


def test_the_routing_stats_report_the_most_requests_in_flight_since_the_last_report(replica: GeneratorReplica) -> None:
    """A replica busy with back-to-back requests is busy for the router even when Serve asks for its stats
    in the gap between two of them: ``inflight`` is the period's peak, not a snapshot."""
    from deployments.routing import ACTIVE_MIX, INFLIGHT

    request = GenerationRequest(params=PARAMS)

    async def two_at_once() -> None:
        await asyncio.gather(*(replica.generate(request, lambda: replica.load_mix("base")) for _ in range(2)))

    replica.routing_stats()  # a fresh period
    asyncio.run(replica.generate(request, lambda: replica.load_mix("base")))
    assert replica.inflight == 0
    assert replica.routing_stats()[INFLIGHT] == 1  # nothing in flight now, one during the period
    assert replica.routing_stats()[INFLIGHT] == 0  # an idle period
    asyncio.run(two_at_once())
    stats = replica.routing_stats()
    assert stats[INFLIGHT] == 2 and stats[ACTIVE_MIX] == "base" and stats["waiting"] == {}
    assert replica.routing_stats()[INFLIGHT] == 0


def test_the_generator_checks_the_limits_the_request_carries(replica: GeneratorReplica) -> None:
    wide = GenerationParams(prompt="a desk", seed=1, steps=1, width=136, height=64)

    async def run(limits: SizeLimits) -> GeneratedImage:
        return await replica.generate(GenerationRequest(wide, limits), lambda: replica.load_mix("base"))

    with pytest.raises(InvalidParameter, match=r"^`width` must be in \[64, 128\] but is 136\.$"):
        asyncio.run(run(SizeLimits(max_side=128)))
    image = asyncio.run(run(SizeLimits(max_side=256)))  # the ingress raised max_side: the generator follows
    assert Image.open(io.BytesIO(image.png)).size == (136, 64)
    assert replica.failures_in_a_row == 0  # a refused request is not the replica's fault
    replica.check_health()


def test_a_replica_whose_pipeline_keeps_failing_reports_unhealthy(replica: GeneratorReplica) -> None:
    replica.check_health()
    replica.generator.pipe.unet = None  # a poisoned pipeline: every generation now fails
    request = GenerationRequest(params=PARAMS)
    for _ in range(UNHEALTHY_AFTER_FAILURES):
        with pytest.raises(Exception) as info:
            asyncio.run(replica.generate(request, lambda: replica.load_mix("base")))
        assert not isinstance(info.value, InvalidParameter)
    with pytest.raises(RuntimeError, match=rf"^{UNHEALTHY_AFTER_FAILURES} generations in a row failed unexpectedly"):
        replica.check_health()


# -- Classifier and Captioner: typed results, batching, reconfigure, health ------------------------


def photos(tiny_models: Path, n: int) -> list[Image.Image]:
    files = sorted((tiny_models / "samples" / "true").glob("*.png"))[:n]
    return [Image.open(f).convert("RGB") for f in files]


def test_the_classifier_batches_concurrent_photos_and_follows_its_threshold(tiny_models: Path) -> None:
    from deskgen.classifier import DeskClassifier

    gate = DeskClassifier.load(tiny_models / "classifier" / "desk_gate.keras")
    classifier = ClassifierDeployment.func_or_class("unused.keras", gate=gate)
    images = photos(tiny_models, 4)

    async def classify_all() -> list[GateVerdict]:
        return list(await asyncio.gather(*(classifier.classify(im) for im in images)))

    async def scenario() -> tuple[list[GateVerdict], list[GateVerdict]]:
        # One event loop, as in a replica: the batcher's queue lives on it.
        classifier.reconfigure({"threshold": 0.0, "max_batch_size": 8, "batch_wait_timeout_s": 0.05})
        permissive = await classify_all()
        classifier.reconfigure({"threshold": 1.0})
        return permissive, await classify_all()

    verdicts, strict = asyncio.run(scenario())
    assert all(isinstance(v, GateVerdict) and v.is_desk and v.threshold == 0.0 for v in verdicts)
    assert [v.score for v in verdicts] == pytest.approx(gate.score_batch(images), abs=1e-6)
    assert max(v.batch_size for v in verdicts) > 1  # concurrent calls shared a forward pass
    # The new threshold applies to the next photos (a saturated tiny gate may score exactly 1.0).
    assert all(v.threshold == 1.0 and v.is_desk == (v.score >= 1.0) for v in strict)
    assert [v.score for v in strict] == pytest.approx([v.score for v in verdicts], abs=1e-6)
    stats = classifier.stats()
    assert stats["items"] == 8 and stats["batches"] < 8
    classifier.check_health()


def test_the_captioner_returns_a_typed_result_and_follows_its_prefixes(tiny_models: Path) -> None:
    from deskgen.captioner import Captioner as BlipCaptioner

    captioner = CaptionerDeployment.func_or_class(
        "unused", captioner=BlipCaptioner.from_pretrained(str(tiny_models / "blip"), device="cpu")
    )
    image = photos(tiny_models, 1)[0]

    async def scenario() -> tuple[CaptionResult, CaptionResult]:
        # One event loop, as in a replica: the batcher's queue lives on it.
        captioner.reconfigure({"prefixes": ["desk_setup:"], "max_keywords": 4})
        styled = await captioner.caption(image, "cyberpunk")
        captioner.reconfigure({"prefixes": []})
        return styled, await captioner.caption(image)

    result, plain = asyncio.run(scenario())
    assert isinstance(result, CaptionResult)
    assert [c["prefix"] for c in result.captions["conditional"]] == ["desk_setup:"]
    assert "cyberpunk" in result.prompt
    assert [k.model_dump() for k in result.public().keywords] == [{"name": k.name, "count": k.count} for k in result.keywords]
    assert plain.captions["conditional"] == []
    captioner.check_health()


def test_pixels_of_an_injected_generator_equal_a_loaded_one(tiny_models: Path, replica: GeneratorReplica) -> None:
    """Injection changes nothing: the deployment's replica draws what a DeskGenerator draws."""
    direct = DeskGenerator.from_pretrained(settings_for(tiny_models)).generate(PARAMS, Mix(())).image
    served = asyncio.run(replica.generate(GenerationRequest(PARAMS), lambda: replica.load_mix("base")))
    assert np.array_equal(np.asarray(direct), np.asarray(Image.open(io.BytesIO(served.png))))


def test_every_pipeline_call_runs_on_the_one_pipeline_thread(tiny_models: Path) -> None:
    """Loads, generations and the unloads of unused adapters all run on the replica's single pipeline thread (one glibc
    arena for the pipeline's allocations: see GeneratorReplica.pipeline_thread), never on the event loop."""
    import threading

    replica = GeneratorReplica(DeskGenerator.from_pretrained(settings_for(tiny_models)), replica_id=lambda: "r1")
    gen = replica.generator
    threads: list[tuple[str, str]] = []
    native: set[int] = set()
    for name in ("generate", "ensure_adapters", "unload_adapters"):
        original = getattr(gen, name)

        def spy(*args: object, _name: str = name, _original: object = original, **kwargs: object) -> object:
            threads.append((_name, threading.current_thread().name))
            native.add(threading.get_native_id())
            return _original(*args, **kwargs)  # type: ignore[operator]

        setattr(gen, name, spy)

    async def scenario() -> None:
        loaded: dict[str, LoadedMix] = {}

        async def get(mix: str) -> LoadedMix:
            if mix not in loaded:
                loaded[mix] = await replica.load_mix(mix)
            return loaded[mix]

        for name in ("dalle_only", "ott_3d", "dalle_only"):
            await replica.generate(GenerationRequest(PARAMS, mix_label=name), lambda n=name: get(mix_id(n)))  # type: ignore[misc]
        loaded.pop(mix_id("ott_3d")).release()

    asyncio.run(scenario())
    assert {n for n, _ in threads} == {"generate", "ensure_adapters", "unload_adapters"}
    assert len({t for _, t in threads}) == 1  # one thread, the replica's own
    assert threads[0][1].startswith("pipeline") and threads[0][1] != threading.main_thread().name
    # The replica names the OS threads of its own work (bench.router splits its CPU time by them): the pipeline
    # thread, and the event loop its request code ran on (asyncio.run's, this thread's).
    (pipeline,) = native
    assert replica.info()["threads"] == {"pipeline": pipeline, "requests": threading.get_native_id()}
