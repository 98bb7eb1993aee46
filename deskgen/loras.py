"""The LoRA registry: the style adapters a generator may load, by name, from one folder.

An adapter ``name`` is the file ``<folder>/<name>.safetensors``. Names come from clients (inside ad-hoc
mixes), so the registry is the gate between a request and the file system: a name must match
:data:`deskgen.mixes.ADAPTER_NAME_RE` (no separators, no dots), and the file it names must resolve to a
regular file inside the folder, so a symlink pointing out of the folder is refused as if it did not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from deskgen import kohya
from deskgen.errors import InvalidParameter, ModelFilesMissing, UnknownMix
from deskgen.mixes import ADAPTER_NAME_RE, validate_adapter_name

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
LoraLayout = Literal["kohya", "diffusers"]

_PEFT_A = (".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight", "_lora.down.weight")


def read_safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file, read from its JSON header without loading a tensor."""
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    return [key for key in header if key != "__metadata__"]


class LoraRegistry:
    """Finds, validates and fingerprints the LoRA files in ``folder``.

    Responsibilities: list the adapters (:meth:`names`); turn a client-supplied name into a safe path
    (:meth:`path`, raising :class:`UnknownMix` listing the available names); give each file's sha256
    (:meth:`sha256`, cached: written into every image's metadata so an output names the exact weights);
    tell the key layout (:meth:`layout`) and the number of modules a file targets (:meth:`module_count`),
    which the generator compares with what actually loaded. Thread-safe.
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFilesMissing("LoRA folder", str(folder))
        self.folder = folder.resolve()
        self._lock = threading.Lock()
        self._sha256: dict[str, str] = {}

    def names(self) -> list[str]:
        """Sorted names of the valid adapters in the folder (files that :meth:`path` would accept)."""
        found = []
        for entry in self.folder.iterdir():
            if entry.name.endswith(LORA_SUFFIX):
                name = entry.name[: -len(LORA_SUFFIX)]
                if ADAPTER_NAME_RE.fullmatch(name) and self._inside(entry):
                    found.append(name)
        return sorted(found)

    def path(self, name: str, *, field: str = "mix") -> Path:
        """The resolved file of adapter ``name``.

        Raises InvalidParameter if ``name`` is not a plain adapter name (``../x``, ``a/b``, ``x.bin``),
        UnknownMix if no such ``.safetensors`` file is inside the folder.
        """
        validate_adapter_name(name, field=field)
        candidate = self.folder / f"{name}{LORA_SUFFIX}"
        if not self._inside(candidate):
            raise UnknownMix(
                f"`{field}`: unknown adapter {name!r}; available adapters are {self.names()}.", field=field
            )
        return candidate.resolve()

    def sha256(self, name: str) -> str:
        """Hex sha256 of the adapter's file, computed once per registry."""
        with self._lock:
            cached = self._sha256.get(name)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        with self.path(name).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        with self._lock:
            self._sha256[name] = value
        return value

    def layout(self, name: str) -> LoraLayout:
        """``"kohya"`` for kohya_ss/sd-scripts keys (``lora_unet_...lora_down.weight``), ``"diffusers"`` for
        diffusers/peft keys (``unet....lora_A.weight``). Raises InvalidParameter for anything else."""
        keys = read_safetensors_keys(self.path(name))
        if any(k.startswith(kohya.PREFIXES) for k in keys):
            return "kohya"
        if any(k.endswith(_PEFT_A) for k in keys):
            return "diffusers"
        raise InvalidParameter(
            f"adapter {name!r}: {self.path(name)} holds neither kohya (lora_unet_...) nor diffusers (....lora_A.weight) LoRA keys.",
            field="mix",
        )

    def module_count(self, name: str) -> int:
        """How many layers the file adapts (one per down/A matrix), whatever its layout."""
        keys = read_safetensors_keys(self.path(name))
        return sum(1 for k in keys if k.endswith((kohya.DOWN, *_PEFT_A)))

    def _inside(self, candidate: Path) -> bool:
        # resolve() follows symlinks: a link (or a link in the chain) leading out of the folder, or to
        # something that is not a regular file, does not count as an adapter.
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return resolved.is_file() and resolved.is_relative_to(self.folder) and resolved.name.endswith(LORA_SUFFIX)


@contextlib.contextmanager
def quiet_adapter_load() -> Iterator[None]:
    """Silence the known-spurious warnings of ``load_lora_weights`` while it runs (not thread-safe: call under a lock)."""
    # transformers logs a "LOAD REPORT ... MISSING" table per text encoder on every adapter load, listing
    # the *other* adapters' keys (it expects all of them in each file). We check what loaded ourselves
    # (deskgen.generator.DeskGenerator checks the layer count, deskgen.tools.tiny_sdxl.verify the weights), so that warning is noise here.
    # peft likewise warns "Already found a `peft_config` attribute" for every adapter after the first:
    # several adapters per model is exactly what we want.
    logger = logging.getLogger("transformers.integrations.peft")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        logger.setLevel(previous)
