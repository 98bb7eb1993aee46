"""The ingress's LoRA catalogue and mix choice: which adapters exist and may be used, the named mixes over
them, and the mix a request gets (asked for, the multiplexed-id header, its concept's, its A/B arm, or the
default).

The adapters are the ``*.safetensors`` files in the generators' ``lora_dir``, listed here without asking a
GPU replica and re-listed every ``catalog_ttl_s`` (a file added there is usable without a restart). Each
file's verdict is cached once (deskgen.loras.LoraRegistry: its header check, redone only when the file
changes); what only a replica can tell (the key mapping onto the model needs torch, the fit into hot-swap
slots) joins it, for as long as that file is unchanged, once a replica refused a file or, in the background
while this ingress has no generation in flight, once a replica's own look at the folder (it checks new files
within seconds) listed it: so a file no replica can load is listed unavailable before a request names it. Where the folder is not visible from the ingress's
node, the list comes from a Generator replica instead (same refresh). The verdicts live in one cache per file
version: the registry's (deskgen.loras.LoraRegistry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.allocation import Allocator
from deployments.ingress_models import IngressConfig
from deskgen.concepts import Concept
from deskgen.errors import AdapterUnavailable, DeskgenError, InvalidParameter
from deskgen.loras import LoraRegistry
from deskgen.mixes import Mix, MixCatalog

log = logging.getLogger("ray.serve")

#: A request's concept preset: its name (``auto`` resolved) and the preset.
Chosen = tuple[str, Concept]


class MixCatalogue:
    def __init__(self, config: Callable[[], IngressConfig], generator: Any, lora_dir: Path | None,
                 allocator: Allocator, quiet: Callable[[], bool] = lambda: True) -> None:  # fmt: skip
        self.config = config
        #: Whether no generation of this ingress is in flight: only then are the replicas asked for their
        #: verdicts (an ``info`` call takes a place in a replica's queue, which a generation may need).
        self.quiet = quiet
        self.generator = generator
        self.lora_dir = lora_dir
        self.allocator = allocator
        self._adapters: tuple[str, ...] | None = None
        #: Adapter files present but unusable (deskgen.loras.lora_file_problem), with the reason.
        self._unavailable: dict[str, str] = {}
        self._adapters_at = 0.0
        self._registry: LoraRegistry | None = None  # each file's verdicts, per file version
        self._catalog: MixCatalog | None = None
        #: Canonical mix id -> its name in the catalogue (the ``mix`` label of the metrics).
        self.names: dict[str, str] = {}
        self._watcher: asyncio.Task[None] | None = None

    def reconfigured(self) -> None:
        """The named mixes may have changed: the catalogue is rebuilt on next use."""
        self._catalog = None

    async def adapters(self) -> tuple[str, ...]:
        self._ensure_watching()
        now = time.monotonic()
        if self._adapters is not None and now - self._adapters_at < self.config().catalog_ttl_s:
            return self._adapters
        if self.lora_dir is not None and self.lora_dir.is_dir():
            # The same header check a generator replica runs at start (no torch here): a bad file is listed
            # as unavailable and a mix naming it answered 422, not a 500 from the replica.
            if self._registry is None or self._registry.folder != self.lora_dir.resolve():
                self._registry = LoraRegistry(self.lora_dir)
            unavailable = self._registry.unavailable()
            names = tuple(n for n in self._registry.names() if n not in unavailable)
        else:
            info = await self.generator.info.remote()
            names, unavailable = tuple(info["adapters"]), dict(info.get("unavailable", {}))
        if names != self._adapters or unavailable != self._unavailable:
            self._catalog = None
        self._adapters, self._unavailable, self._adapters_at = names, unavailable, now
        return names

    def _ensure_watching(self) -> None:
        if self.lora_dir is not None and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch_replica_verdicts())

    async def _watch_replica_verdicts(self) -> None:
        """Every ``catalog_ttl_s``, a Generator replica's verdicts on the folder's files (``info``: answered
        at once, beside any generation), recorded per file version like a refusal."""
        while True:
            ttl = self.config().catalog_ttl_s
            if self.quiet():  # under load, the first refusal teaches it instead (note_unavailable)
                try:
                    info = await asyncio.wait_for(self.generator.info.remote(), timeout=max(ttl, 1.0))
                    self.learn_verdicts(dict(info.get("unavailable", {})))
                except Exception as exc:  # a replica starting or gone: the next look will do
                    log.debug("catalogue: no replica verdicts this time: %r", exc)
            await asyncio.sleep(ttl)

    def learn_verdicts(self, unavailable: dict[str, str]) -> None:
        """Record what a replica found wrong with files the ingress's header check passed."""
        registry = self._registry
        if registry is None:
            return
        learned = False
        for name, reason in unavailable.items():
            with contextlib.suppress(DeskgenError):
                if registry.problem(name) is None and registry.recorded(name) != (True, reason):
                    registry.record(name, reason)
                    learned = True
        if learned:
            self._adapters_at = float("-inf")  # re-list on the next use

    def note_unavailable(self, exc: AdapterUnavailable) -> None:
        """A generator replica refused an adapter: record it as unavailable until its file changes, and
        re-read the catalogue on the next request (polling the replicas instead would queue calls behind
        their generations)."""
        name, reason = str(exc.extra.get("adapter", "")), str(exc.extra.get("reason", ""))
        if name and self._registry is not None:
            with contextlib.suppress(DeskgenError):
                self._registry.record(name, reason)
        self._adapters_at = float("-inf")

    async def catalog(self) -> MixCatalog:
        adapters = await self.adapters()
        if self._catalog is None:
            self._catalog = MixCatalog(list(adapters), self.config().mixes, unavailable=self._unavailable)
            self.names = {m.id: n for n, m in reversed(self._catalog.named.items())}
        return self._catalog

    async def choose(self, requested: str | None, header_mix: str | None, user_id: str | None,
                     concept: Chosen | None = None) -> tuple[Mix, dict[str, Any]]:  # fmt: skip
        """The mix to use and how it was chosen: ``request``, ``header`` (``serve_multiplexed_model_id``),
        ``concept`` (the concept preset's mix), ``ab`` or ``default``."""
        config = self.config()
        catalog = await self.catalog()
        if requested is not None and header_mix is not None and catalog.resolve(requested).id != catalog.resolve(header_mix, field="serve_multiplexed_model_id").id:
            raise InvalidParameter(
                f"`mix` is {requested!r} but the serve_multiplexed_model_id header is {header_mix!r}: send one.",
                field="mix",
            )
        if requested is not None:
            name, source, arm = requested, "request", None
        elif header_mix is not None:
            name, source, arm = header_mix, "header", None
        elif concept is not None and concept[1].mix is not None:
            name, source, arm = concept[1].mix, "concept", None
        elif config.ab_split:
            arm = await self.allocator.arm(config.experiment, user_id)
            name, source = arm, "ab"
        else:
            name, source, arm = config.default_mix, "default", None
        field = "serve_multiplexed_model_id" if source == "header" else "mix"
        mix = catalog.resolve(name, field=field)
        named = name if name in catalog.named else None
        return mix, {"id": mix.id, "name": named, "weights": mix.as_dict(), "source": source, "arm": arm}
