"""Training examples from the images users liked: an experiment's arm, its feedback, the image store.

The experiment store knows which delivered images of an arm got feedback ``like``, ``download`` or
``select`` (the events chosen); the image store (:mod:`deskgen.imagestore`) holds their PNGs for its
retention; each PNG carries its recipe, whose prompt becomes the caption (what the image was generated
from). Images that have left the store are skipped and counted; an unknown experiment or arm, no liked
image, or none left in the store is an InvalidParameter naming the item.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from deskgen.errors import InvalidParameter
from deskgen.experiments.store import ExperimentStore
from deskgen.imagestore import ImageStore
from deskgen.lora_training.config import LoraTrainingConfig
from deskgen.lora_training.data import MAX_CAPTION_CHARS, TrainingExample, open_checked
from deskgen.pngmeta import read_png_metadata

log = logging.getLogger(__name__)

LIKED_EVENTS = ("like", "download", "select")


@dataclass(frozen=True)
class LikedSelection:
    examples: list[TrainingExample]
    liked: int
    missing: int


def liked_examples(
    experiments: ExperimentStore,
    images: ImageStore,
    experiment_id: str,
    arm: str,
    config: LoraTrainingConfig,
    events: Sequence[str] = LIKED_EVENTS,
) -> LikedSelection:
    unknown = [e for e in events if e not in ("like", "dislike", "download", "select")]
    if not events or unknown:
        raise InvalidParameter(
            f"`events` must name some of like, download, select but has {list(unknown or events)!r}.", field="events"
        )
    experiment = experiments.experiment(experiment_id)
    if experiment is None:
        known = experiments.experiment_ids()
        raise InvalidParameter(f"`experiment`: no experiment {experiment_id!r}; the store has {known}.", field="experiment")
    if arm not in experiment.split:
        raise InvalidParameter(
            f"`arm`: experiment {experiment_id!r} has no arm {arm!r}; its arms are {sorted(experiment.split)}.", field="arm"
        )
    ids = experiments.liked_image_ids(experiment_id, arm, events)
    if not ids:
        raise InvalidParameter(
            f"`arm`: no image of arm {arm!r} in experiment {experiment_id!r} has feedback {'/'.join(events)}.", field="arm"
        )
    examples, missing = [], 0
    for image_id in ids:
        png = images.get(image_id)
        if png is None:
            missing += 1
            continue
        open_checked(png, f"image {image_id}", config)
        try:
            prompt = str(read_png_metadata(png).get("prompt") or "").strip()
        except KeyError:
            prompt = ""
        if not prompt:
            raise InvalidParameter(f"`image_store`: image {image_id} carries no prompt in its metadata.", field="image_store")
        examples.append(TrainingExample(source=f"image {image_id}", image=png, caption=prompt[:MAX_CAPTION_CHARS]))
    if not examples:
        raise InvalidParameter(
            f"`image_store`: the {len(ids)} liked images of arm {arm!r} are no longer in the image store "
            f"{images.folder} (kept {images.retention_s / 3600:g} h, at most {images.max_bytes / 1e6:g} MB).",
            field="image_store",
        )
    if missing:
        log.warning("%d of %d liked images are no longer in the image store; training on %d", missing, len(ids), len(examples))
    return LikedSelection(examples, liked=len(ids), missing=missing)
