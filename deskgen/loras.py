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
from typing import Any, Literal

from deskgen import kohya
from deskgen.errors import InvalidParameter, ModelFilesMissing, UnknownMix
from deskgen.mixes import ADAPTER_NAME_RE, validate_adapter_name

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
LoraLayout = Literal["kohya", "diffusers"]

_PEFT_A = (".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight", "_lora.down.weight")


def safetensors_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a .safetensors file from its bytes (the first 8 + header length suffice):
    tensor name -> dtype, shape, offsets, and ``__metadata__`` (strings)."""
    (length,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + length]))


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """:func:`safetensors_header` of the file at ``path``, reading only the header."""
    with path.open("rb") as f:
        head = f.read(8)
        return safetensors_header(head + f.read(struct.unpack("<Q", head)[0]))


def read_safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file, read from its JSON header without loading a tensor."""
    return [key for key in read_safetensors_header(path) if key != "__metadata__"]


#: A safetensors header larger than this is not a LoRA file (real ones: tens to hundreds of KB).
MAX_HEADER_BYTES = 64 << 20
#: Key endings of LyCORIS networks diffusers cannot load (LoHa, LoKr, (IA)^3, GLoRA, OFT/BOFT, full diff).
_LYCORIS = {
    ".hada_w1_a": "LoHa", ".hada_w1_b": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr", ".lokr_w2": "LoKr",
    ".lokr_w2_a": "LoKr", ".on_input": "(IA)^3", ".a1.weight": "GLoRA", ".oft_blocks": "OFT", ".oft_diag": "OFT",
    ".boft_blocks": "BOFT", ".diff": "full (weight difference)", ".diff_b": "full (weight difference)",
}  # fmt: skip
#: DoRA magnitude vectors: kohya/LyCORIS write ``dora_scale``, peft ``lora_magnitude_vector``. diffusers 0.42
#: drops ``dora_scale`` with a warning and loads the rest as a plain LoRA, i.e. silently another style.
_DORA = (".dora_scale", ".lora_magnitude_vector")
_KOHYA_PAIR = {kohya.DOWN: kohya.UP}
_PEFT_PAIRS = {".lora_A.weight": ".lora_B.weight", ".lora_A.default.weight": ".lora_B.default.weight",
               ".lora.down.weight": ".lora.up.weight", "_lora.down.weight": "_lora.up.weight"}  # fmt: skip


def lora_file_problem(path: Path) -> str | None:
    """Why diffusers cannot load the LoRA file at ``path`` as a LoRA for SDXL, or None if its header looks
    loadable. Reads only the safetensors header (no tensor, no torch), so the ingress can run it too.

    Refused: a file that is not a complete safetensors file (short, a header that is not JSON, tensor data
    that runs past the end of the file: a truncated copy), LyCORIS networks (LoHa, LoKr, ...), DoRA
    (magnitude vectors), keys in neither the kohya_ss (``lora_unet_``/``lora_te1_``/``lora_te2_``) nor the
    diffusers/peft (``unet.``/``text_encoder*.`` + ``lora_A``/``lora_B``) layout, and down/A matrices
    without their up/B partner. Whether the modules a file names exist in *this* model needs the model:
    :func:`deskgen.generator.adapters.mapping_problem` checks that on a replica.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"not a safetensors file: {size} bytes, shorter than the 8-byte header length"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                return f"not a safetensors file (or truncated): a header of {header_len} bytes in a file of {size} bytes"
            header = json.loads(f.read(header_len))
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        return "holds no tensors"
    try:
        end = max(int(v["data_offsets"][1]) for v in tensors.values())
    except (TypeError, KeyError, IndexError, ValueError):
        return "not a safetensors file: a tensor entry has no valid data_offsets"
    if 8 + header_len + end > size:
        return f"truncated: its tensors need {8 + header_len + end} bytes but the file has {size}"
    keys = list(tensors)
    for ending, kind in _LYCORIS.items():
        if any(k.endswith(ending) for k in keys):
            example = next(k for k in keys if k.endswith(ending))
            return f"a LyCORIS {kind} network (keys like {example!r}); diffusers loads LoRA only"
    dora = [k for k in keys if k.endswith(_DORA)]
    if dora:
        return (f"a DoRA file ({dora[0]!r}): diffusers would drop its magnitude vectors and load it as a plain "
                "LoRA, i.e. another style")  # fmt: skip
    if any(k.startswith(kohya.PREFIXES) for k in keys):
        pairs = _KOHYA_PAIR
        stray = [k for k in keys if not k.startswith(kohya.PREFIXES)]
        if stray:
            return f"kohya_ss keys mixed with other keys ({stray[0]!r})"
    elif any(k.endswith(tuple(_PEFT_PAIRS)) for k in keys):
        pairs = _PEFT_PAIRS
    else:
        return f"neither kohya_ss (lora_unet_...) nor diffusers (....lora_A.weight) LoRA keys (e.g. {sorted(keys)[0]!r})"
    key_set = set(keys)
    for key in keys:
        for down, up in pairs.items():
            if key.endswith(down) and key.removesuffix(down) + up not in key_set:
                return f"{key!r} has no {up.lstrip('.')!r} partner"
    return None


class LoraRegistry:
    """Finds, validates and fingerprints the LoRA files in ``folder``.

    Responsibilities: list the adapters (:meth:`names`); turn a client-supplied name into a safe path
    (:meth:`path`, raising :class:`UnknownMix` listing the available names); give each file's sha256
    (:meth:`sha256`, cached: written into every image's metadata so an output names the exact weights);
    tell the key layout (:meth:`layout`) and the number of modules a file targets (:meth:`module_count`),
    which the generator compares with what actually loaded. It is the one cache of each file's verdict, per
    file version (size, mtime): the header check (:meth:`problem`), and what a deeper check found
    (:meth:`record`: the key mapping onto the model, a failed load, a generator replica's refusal), both
    forgotten when the file changes. Thread-safe.
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFilesMissing("LoRA folder", str(folder))
        self.folder = folder.resolve()
        self._lock = threading.Lock()
        self._sha256: dict[str, str] = {}
        #: name -> ((size, mtime_ns), problem or None): a file is checked again only when it changes.
        self._checked: dict[str, tuple[tuple[int, int], str | None]] = {}
        #: name -> ((size, mtime_ns), problem or None): what a check beyond the header found for that version.
        self._recorded: dict[str, tuple[tuple[int, int], str | None]] = {}

    def names(self) -> list[str]:
        """Sorted names of the valid adapters in the folder (files that :meth:`path` would accept)."""
        found = []
        for entry in self.folder.iterdir():
            if entry.name.endswith(LORA_SUFFIX):
                name = entry.name[: -len(LORA_SUFFIX)]
                if ADAPTER_NAME_RE.fullmatch(name) and self._inside(entry):
                    found.append(name)
        return sorted(found)

    def problems(self) -> dict[str, str]:
        """name -> why it cannot be loaded (:func:`lora_file_problem`), for every file of :meth:`names` whose
        header is refused. Each file is read once per (size, mtime): cheap to call on every catalogue refresh."""
        found: dict[str, str] = {}
        for name in self.names():
            problem = self.problem(name)
            if problem is not None:
                found[name] = problem
        return found

    def problem(self, name: str) -> str | None:
        """Why adapter ``name``'s file cannot be loaded, or None (see :func:`lora_file_problem`)."""
        path = self.path(name)
        try:
            stat = path.stat()
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._checked.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        problem = lora_file_problem(path)
        if problem is not None:
            log.warning("LoRA %s (%s) is unavailable: %s", name, path, problem)
        with self._lock:
            self._checked[name] = (stamp, problem)
        return problem

    def version(self, name: str) -> tuple[int, int] | None:
        """The file's (size, mtime_ns), its version for the verdicts; None when it cannot be read or is no
        longer in the folder."""
        try:
            stat = self.path(name).stat()
        except (OSError, UnknownMix):
            return None
        return (stat.st_size, stat.st_mtime_ns)

    def record(self, name: str, problem: str | None) -> None:
        """Remember what a check beyond the header found for the file's current version (None: usable)."""
        version = self.version(name)
        if version is not None:
            with self._lock:
                self._recorded[name] = (version, problem)

    def recorded(self, name: str) -> tuple[bool, str | None]:
        """Whether the file's current version has a recorded verdict, and that verdict."""
        version = self.version(name)
        with self._lock:
            entry = self._recorded.get(name)
        if version is None or entry is None or entry[0] != version:
            return False, None
        return True, entry[1]

    def unavailable(self) -> dict[str, str]:
        """name -> reason for every file known to be unusable now: its header refused, or a recorded verdict
        of its current version."""
        found = self.problems()
        for name in self.names():
            known, problem = self.recorded(name)
            if known and problem is not None and name not in found:
                found[name] = problem
        return dict(sorted(found.items()))

    def usable(self) -> list[str]:
        """Sorted names of the adapters whose files pass :meth:`problem`."""
        problems = self.problems()
        return [name for name in self.names() if name not in problems]

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


#: The diffusers loggers that warn "No LoRA keys associated to <text encoder> ... safe to ignore" for every
#: load of a LoRA that adapts no text encoder (most SDXL trainings adapt the UNet only): twice per load.
_NO_KEYS_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")


def _not_no_keys(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No LoRA keys associated to ")


@contextlib.contextmanager
def quiet_adapter_load() -> Iterator[None]:
    """Silence the known-spurious warnings of ``load_lora_weights`` while it runs (not thread-safe: call under a lock)."""
    # transformers logs a "LOAD REPORT ... MISSING" table per text encoder on every adapter load, listing
    # the *other* adapters' keys (it expects all of them in each file). We check what loaded ourselves
    # (deskgen.generator.DeskGenerator checks the layer count, deskgen.tools.tiny_sdxl.verify the weights), so that warning is noise here.
    # peft likewise warns "Already found a `peft_config` attribute" for every adapter after the first:
    # several adapters per model is exactly what we want. diffusers warns, twice per load, that a file adapts
    # no text encoder (_NO_KEYS_LOGGERS): that is the file's choice, and the layers it adapts are checked as above.
    logger = logging.getLogger("transformers.integrations.peft")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    for name in _NO_KEYS_LOGGERS:
        logging.getLogger(name).addFilter(_not_no_keys)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        logger.setLevel(previous)
        for name in _NO_KEYS_LOGGERS:
            logging.getLogger(name).removeFilter(_not_no_keys)
