"""deskgen.loras.LoraRegistry: names, safe paths, hashes and layouts of the tiny LoRA files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from deskgen.errors import InvalidParameter, ModelFilesMissing, UnknownMix
from deskgen.loras import LoraRegistry, read_safetensors_keys

pytestmark = pytest.mark.unit


@pytest.fixture
def registry(tiny_models: Path) -> LoraRegistry:
    return LoraRegistry(tiny_models / "loras")


@pytest.fixture
def scratch(tiny_models: Path, tmp_path: Path) -> Path:
    """A LoRA folder holding one real adapter (dalle), next to a folder outside it."""
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_models / "loras" / "dalle.safetensors", folder / "dalle.safetensors")
    (tmp_path / "outside").mkdir()
    shutil.copy(tiny_models / "loras" / "ott.safetensors", tmp_path / "outside" / "evil.safetensors")
    return folder


def test_names_are_the_three_styles(registry: LoraRegistry) -> None:
    assert registry.names() == ["3d", "dalle", "ott"]


def test_layouts(registry: LoraRegistry) -> None:
    assert [registry.layout(n) for n in ("dalle", "3d", "ott")] == ["kohya", "kohya", "diffusers"]
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in
               read_safetensors_keys(registry.path("dalle")))
    assert any(k.startswith("lora_te2_") for k in read_safetensors_keys(registry.path("3d")))
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") and k.endswith(".lora_A.weight")
               for k in read_safetensors_keys(registry.path("ott")))


def test_sha256_matches_file_and_is_cached(registry: LoraRegistry, tiny_models: Path) -> None:
    expected = hashlib.sha256((tiny_models / "loras" / "ott.safetensors").read_bytes()).hexdigest()
    assert registry.sha256("ott") == expected
    assert registry.sha256("ott") == expected
    assert len({registry.sha256(n) for n in registry.names()}) == 3  # three different files


def test_module_count_is_one_per_down_matrix(registry: LoraRegistry) -> None:
    for name in registry.names():
        keys = read_safetensors_keys(registry.path(name))
        downs = [k for k in keys if k.endswith((".lora_down.weight", ".lora_A.weight"))]
        assert registry.module_count(name) == len(downs) > 0
    # Same targets in both layouts: UNet attention projections + both text encoders' attention.
    assert registry.module_count("dalle") == registry.module_count("ott") == registry.module_count("3d")


@pytest.mark.parametrize("name", ["../x", "a/b", "dalle.safetensors", "/etc/passwd", "", ".hidden", "a b"])
def test_path_rejects_names_that_are_not_plain(registry: LoraRegistry, name: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        registry.path(name)
    assert info.value.field == "mix"
    assert info.value.message == (
        f"`mix`: adapter names are 1-64 letters, digits, '_' or '-' (no paths) but got {name!r}."
    )


def test_unknown_name_lists_available(registry: LoraRegistry) -> None:
    with pytest.raises(UnknownMix) as info:
        registry.path("vaporwave")
    assert info.value.message == "`mix`: unknown adapter 'vaporwave'; available adapters are ['3d', 'dalle', 'ott']."


def test_non_safetensors_files_are_not_adapters(scratch: Path) -> None:
    (scratch / "weights.bin").write_bytes(b"\0" * 16)
    (scratch / "notes.txt").write_text("not a lora")
    (scratch / "folder.safetensors").mkdir()
    registry = LoraRegistry(scratch)
    assert registry.names() == ["dalle"]
    for name in ("weights", "notes", "folder"):
        with pytest.raises(UnknownMix, match=rf"unknown adapter '{name}'; available adapters are \['dalle'\]"):
            registry.path(name)


def test_symlink_escaping_the_folder_is_refused(scratch: Path) -> None:
    escape = scratch / "evil.safetensors"
    escape.symlink_to(scratch.parent / "outside" / "evil.safetensors")
    dangling = scratch / "gone.safetensors"
    dangling.symlink_to(scratch / "missing.safetensors")
    alias = scratch / "alias.safetensors"  # a link that stays inside the folder is fine
    alias.symlink_to(scratch / "dalle.safetensors")
    registry = LoraRegistry(scratch)
    assert registry.names() == ["alias", "dalle"]
    with pytest.raises(UnknownMix, match=r"unknown adapter 'evil'; available adapters are \['alias', 'dalle'\]"):
        registry.path("evil")
    with pytest.raises(UnknownMix, match="unknown adapter 'gone'"):
        registry.sha256("gone")
    assert registry.path("alias") == (scratch / "dalle.safetensors").resolve()
    assert registry.sha256("alias") == registry.sha256("dalle")


def test_file_without_lora_keys_has_no_layout(scratch: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.weight": torch.zeros(2, 2)}, str(scratch / "plain.safetensors"))
    with pytest.raises(InvalidParameter, match=r"holds neither kohya .* nor diffusers .* LoRA keys"):
        LoraRegistry(scratch).layout("plain")


def test_missing_folder_raises_model_files_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing) as info:
        LoraRegistry(tmp_path / "nowhere")
    assert info.value.path == str(tmp_path / "nowhere")
    assert "LoRA folder not found at" in str(info.value)


def test_a_rebuild_is_byte_identical_and_verifies(tiny_models: Path, tmp_path: Path) -> None:
    # build() ends with tiny_sdxl.verify (every module of every LoRA loaded with its weights, each LoRA
    # changes the image), and the adapters' sha256 lands in image metadata: both must be stable.
    from deskgen.tools import tiny_sdxl

    tiny_sdxl.build(tmp_path)

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("sdxl", "loras")
            for p in sorted((root / folder).rglob("*"))
            if p.is_file()
        }

    rebuilt = digests(tmp_path)
    assert {"loras/dalle.safetensors", "loras/ott.safetensors", "loras/3d.safetensors"} <= set(rebuilt)
    assert rebuilt == digests(tiny_models)


def test_a_recorded_verdict_holds_for_its_file_version_only(scratch: Path) -> None:
    """The one cache of verdicts: a deeper check's (or a replica's) verdict counts while the file is unchanged,
    and is forgotten when the file changes."""
    import os

    shutil.copy(scratch / "dalle.safetensors", scratch / "other.safetensors")
    registry = LoraRegistry(scratch)
    assert registry.recorded("other") == (False, None) and "other" not in registry.unavailable()
    registry.record("other", "targets layers this model lacks")
    assert registry.recorded("other") == (True, "targets layers this model lacks")
    assert registry.unavailable()["other"] == "targets layers this model lacks"
    registry.record("dalle", None)
    assert registry.recorded("dalle") == (True, None) and "dalle" not in registry.unavailable()
    path = scratch / "other.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new version of the file
    assert registry.recorded("other") == (False, None) and "other" not in registry.unavailable()
    # A file removed: no version, no verdict, and no error (a replica asks about the adapters it still holds).
    path.unlink()
    assert registry.version("other") is None and registry.recorded("other") == (False, None)
    registry.record("other", None)  # nothing to record it against
    assert registry.recorded("other") == (False, None)
