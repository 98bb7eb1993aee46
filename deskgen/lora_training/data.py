"""Training examples: images with captions, from a kohya-style folder or from liked generations.

A folder holds images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) with a ``.txt`` caption beside each one
(``desk1.png`` + ``desk1.txt``), as kohya_ss datasets are laid out. An image without a caption (no ``.txt``,
or an empty one) is captioned by the service's own captioner (BLIP with its prefixes, turned into a prompt
as the Captioner deployment does) when one is given, else refused. Every image is decoded and its size
checked here, before any model is loaded: a bad item is named in the error.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from deskgen.errors import InvalidParameter
from deskgen.lora_training.config import LoraTrainingConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: A caption longer than this is cut (CLIP reads 77 tokens; kohya captions are a line or two).
MAX_CAPTION_CHARS = 1000

Captioner = Callable[[Image.Image], str]


@dataclass(frozen=True)
class TrainingExample:
    """One image (its encoded bytes, as stored) and the caption it is trained with."""

    source: str
    image: bytes
    caption: str

    def as_row(self) -> dict[str, Any]:
        return {"source": self.source, "image": self.image, "caption": self.caption}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrainingExample:
        return cls(source=str(row["source"]), image=bytes(row["image"]), caption=str(row["caption"]))


def open_checked(data: bytes, source: str, config: LoraTrainingConfig, *, field: str = "data") -> Image.Image:
    """The decoded RGB image, or InvalidParameter naming ``source`` (not an image, or too small)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidParameter(
            f"`{field}`: {source} is not an image Pillow can decode ({exc}).", field=field
        ) from None
    width, height = image.size
    if min(width, height) < config.smallest_side:
        raise InvalidParameter(
            f"`{field}`: {source} is {width}x{height}; training at {config.resolution} px needs images whose "
            f"shorter side is at least {config.smallest_side} px.",
            field=field,
        )
    return image.convert("RGB")


def folder_examples(
    folder: Path, config: LoraTrainingConfig, captioner: Captioner | None = None, *, field: str = "data"
) -> list[TrainingExample]:
    """Every image of ``folder`` (not recursive, sorted by name) with its caption."""
    if not folder.is_dir():
        raise InvalidParameter(f"`{field}`: {folder} is not a folder.", field=field)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidParameter(
            f"`{field}`: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), each with a .txt caption beside it.",
            field=field,
        )
    examples = []
    for path in files:
        data = path.read_bytes()
        image = open_checked(data, str(path), config, field=field)
        caption_file = path.with_suffix(".txt")
        caption = (
            caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if caption_file.is_file()
            else ""
        )
        if not caption:
            if captioner is None:
                raise InvalidParameter(
                    f"`{field}`: {path} has no caption ({caption_file.name} is missing or empty) and no captioner is set.",
                    field=field,
                )
            caption = captioner(image)
            log.info("captioned %s: %s", path.name, caption)
        examples.append(TrainingExample(source=str(path), image=data, caption=caption[:MAX_CAPTION_CHARS]))
    return examples


def data_sha256(examples: Iterable[TrainingExample]) -> str:
    """A hash of the training data: every image's bytes and its caption, independent of order and source."""
    items = sorted(hashlib.sha256(e.image).hexdigest() + "\n" + e.caption for e in examples)
    return hashlib.sha256("\n\n".join(items).encode()).hexdigest()


def service_captioner(model_id: str, *, device: str | None = None) -> Captioner:
    """Caption like the service: BLIP with the Captioner's default prefixes, ranked keywords, the prompt."""
    from deskgen.captioner import Captioner as BlipCaptioner
    from deskgen.prompts.build import build_prompt
    from deskgen.prompts.captions import rank_keywords

    blip = BlipCaptioner.from_pretrained(model_id, device=device)

    def caption(image: Image.Image) -> str:
        texts = blip.caption(image).texts()
        return build_prompt(texts, rank_keywords(texts)).prompt

    return caption


def prepare_pixels(image: Image.Image, resolution: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """The image resized (shorter side) and centre-cropped to a square ``resolution`` tensor in [-1, 1]
    (3, H, W), with SDXL's size conditioning: the original (height, width) and the crop's (top, left)."""
    import numpy as np
    import torch

    width, height = image.size
    scale = resolution / min(width, height)
    resized = image.resize(
        (max(resolution, round(width * scale)), max(resolution, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - resolution) // 2
    top = (resized.height - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left)
