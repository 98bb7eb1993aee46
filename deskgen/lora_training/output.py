"""The trained LoRA as a file in ``lora_dir``: its metadata, the service's own check, an atomic write.

The file is written beside its final name as ``.<name>.safetensors.partial`` (a name the LoRA registry
never lists), checked with :func:`deskgen.loras.lora_file_problem` (the check every LoRA file passes
before a replica loads it) and only then renamed into place, so a generator replica or the catalogue
never sees half a file, and a run that fails leaves nothing in ``lora_dir``.

Metadata (safetensors ``__metadata__``, strings): ``deskgen_training`` (the run's config as JSON),
``deskgen_data_sha256`` (:func:`deskgen.lora_training.data.data_hash`), ``deskgen_examples``,
``deskgen_steps``, ``deskgen_final_loss``, ``deskgen_trained_at``; kohya files also carry kohya_ss's
``ss_network_module``/``ss_network_dim``/``ss_network_alpha``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from deskgen.errors import InvalidParameter
from deskgen.lora_training.config import LoraTrainingConfig
from deskgen.loras import LORA_SUFFIX, lora_file_problem, read_safetensors_header


def output_path(lora_dir: Path, name: str) -> Path:
    return lora_dir / f"{name}{LORA_SUFFIX}"


def check_destination(lora_dir: Path, name: str, *, overwrite: bool = False) -> Path:
    """The path the adapter will have; InvalidParameter when the folder is missing or the name is taken."""
    if not lora_dir.is_dir():
        raise InvalidParameter(f"`lora_dir`: {lora_dir} is not a folder.", field="lora_dir")
    path = output_path(lora_dir, name)
    if path.exists() and not overwrite:
        raise InvalidParameter(
            f"`name`: {path} exists; choose another name (or --overwrite to replace it).", field="name"
        )
    return path


def training_metadata(
    config: LoraTrainingConfig, *, data_sha256: str, examples: int, steps: int, final_loss: float | None
) -> dict[str, str]:
    metadata = {
        "format": "pt",
        "deskgen_training": config.to_json(),
        "deskgen_data_sha256": data_sha256,
        "deskgen_examples": str(examples),
        "deskgen_steps": str(steps),
        "deskgen_final_loss": "" if final_loss is None else f"{final_loss:.6g}",
        "deskgen_trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if config.layout == "kohya":
        metadata.update(ss_network_module="networks.lora", ss_network_dim=str(config.rank),
                        ss_network_alpha=f"{config.effective_alpha:g}")  # fmt: skip
    return metadata


def write_lora(
    tensors: dict[str, Any], metadata: dict[str, str], lora_dir: Path, name: str, *, overwrite: bool = False
) -> Path:
    """Write, check and move the adapter into ``lora_dir``; returns its path. Raises ValueError (nothing
    left behind) when the written file fails the LoRA check."""
    from safetensors.torch import save_file

    path = check_destination(lora_dir, name, overwrite=overwrite)
    partial = lora_dir / f".{name}{LORA_SUFFIX}.partial"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
        problem = lora_file_problem(partial)
        if problem is not None:
            raise ValueError(f"the trained adapter fails the LoRA check: {problem}")
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_training_metadata(path: Path) -> dict[str, Any]:
    """The deskgen metadata of a trained adapter (``training`` parsed from JSON), or {} for other files."""
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    out: dict[str, Any] = {
        k.removeprefix("deskgen_"): v for k, v in metadata.items() if k.startswith("deskgen_")
    }
    if "training" in out:
        out["training"] = json.loads(out["training"])
    return out
