"""What a generator loads and runs that each image's recipe records: the sampler (diffusers scheduler),
the model revision and the weights variant.

:data:`SCHEDULERS` names the samplers a deployment may choose with ``generator_options.scheduler`` (the
A1111/ComfyUI names users know); ``default`` keeps the scheduler the model folder ships. A choice is
built from the folder's scheduler config (``from_config``), so the training betas, prediction type and
timestep spacing of the model stay, and only the sampler changes. :func:`describe_scheduler` and
:func:`model_revision` give what every image's metadata records to be reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import re
from pathlib import Path
from typing import Any

from deskgen.devices import is_cuda

#: name -> (diffusers class, config overrides). ``default``: the folder's own scheduler, unchanged.
#: DPM++ 2M is diffusers' DPMSolverMultistepScheduler at its default ``solver_order=2``.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
#: The config keys recorded with the scheduler's class (what changes the samples of one class).
RECORDED_CONFIG = (
    "algorithm_type", "beta_end", "beta_schedule", "beta_start", "final_sigmas_type", "interpolation_type",
    "num_train_timesteps", "prediction_type", "solver_order", "steps_offset", "timestep_spacing",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
)  # fmt: skip
#: A hub snapshot folder: ``.../models--owner--name/snapshots/<40-hex commit>``.
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")
#: Small text files of a model folder hashed by content (configs, tokenizers); weights by name and size.
_CONTENT_SUFFIXES = (".json", ".txt", ".model")
_CONTENT_MAX_BYTES = 8 << 20


def apply_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the sampler ``name`` (a key of :data:`SCHEDULERS`), built from the
    folder's scheduler config; ``default`` keeps it."""
    import diffusers

    cls_name, overrides = SCHEDULERS[name]
    if not cls_name:
        return
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def describe_scheduler(name: str, scheduler: Any) -> dict[str, Any]:
    """``{"name", "class", "config"}`` of the scheduler a generator runs (JSON-serialisable)."""
    config = dict(scheduler.config)
    # from_config keeps the folder's keys the class does not take (e.g. Euler's interpolation_type in a
    # DPM++ config): record only what this class reads.
    accepted = inspect.signature(type(scheduler).__init__).parameters
    recorded = {k: config[k] for k in RECORDED_CONFIG if k in config and k in accepted}
    return {"name": name, "class": type(scheduler).__name__, "config": _jsonable(recorded)}


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in values.items()}


def model_revision(source: str) -> str:
    """The revision of the model at ``source`` (a local folder or a hub id loaded through the hub cache).

    ``hub:<commit>`` for a hub snapshot (the folder is ``snapshots/<commit>``, or the hub id's cached
    ``model_index.json`` lives in one); otherwise ``files:<16 hex>``, a sha256 over the relative path and
    size of every file and the content of the small text files (configs, tokenizers): a changed config
    or a re-exported weight file changes it, a copy of the folder does not. Cheap: no weight is read.
    """
    path = Path(source)
    if not path.is_dir():
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "model_index.json")
            if isinstance(cached, str):
                path = Path(cached).parent
    resolved = path.resolve() if path.exists() else path
    if _SNAPSHOT.match(resolved.name) and resolved.parent.name == "snapshots":
        return f"hub:{resolved.name}"
    if not resolved.is_dir():
        return "unknown"
    digest = hashlib.sha256()
    for file in sorted(p for p in resolved.rglob("*") if p.is_file()):
        rel = file.relative_to(resolved).as_posix()
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        if file.suffix in _CONTENT_SUFFIXES and size <= _CONTENT_MAX_BYTES:
            digest.update(file.read_bytes())
    return f"files:{digest.hexdigest()[:16]}"


def weights_variant(source: str, *, device: str, dtype: str, allowed: bool = True) -> str | None:
    """``"fp16"`` where the model at ``source`` ships fp16 weights and the replica runs on CUDA in a 16-bit
    dtype (half the bytes to read, the same values once cast); None otherwise: on the CPU or in float32 the
    fp16 rounding would be a loss."""
    if not allowed or not is_cuda(device) or dtype == "float32":
        return None
    return "fp16" if has_fp16_variant(source) else None


def has_fp16_variant(source: str) -> bool:
    """Whether the local model folder ``source`` ships ``variant="fp16"`` weights (``*.fp16.safetensors``
    in its UNet folder). A hub id is answered from the hub's file list, False when it cannot be reached."""
    path = Path(source)
    if path.is_dir():
        return any(path.glob("unet/*.fp16.safetensors")) or any(path.glob("unet/*.fp16.bin"))
    with contextlib.suppress(Exception):
        from huggingface_hub import HfApi

        return any(f.startswith("unet/") and ".fp16." in f for f in HfApi().list_repo_files(source))
    return False
