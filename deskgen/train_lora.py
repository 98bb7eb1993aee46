"""Train the service's own style LoRA on Ray Train and put it into the LoRA folder the service serves from.

    python -m deskgen.train_lora --name mydesk (--data DIR | --liked EXPERIMENT:ARM) [--rank 16] [--alpha A] [--learning-rate 1e-4]
        [--steps 500] [--resolution 1024] [--batch-size 1] [--seed 0] [--text-encoders] [--layout diffusers|kohya]
        [--checkpoint-every N] [--resume] [--overwrite] [--workers 1] [--runs-dir build/lora-runs]
        [--base-model ID|DIR] [--lora-dir DIR] [--captioner ID|DIR] [--progress-every 10]

``--data DIR`` is a kohya-style folder: images (.png .jpg .jpeg .webp) with a .txt caption beside each
(``desk1.png`` + ``desk1.txt``). An image without a caption is captioned by the service's own captioner
(BLIP, ``--captioner``, default the Captioner's model in serve_config.yaml) as the service would prompt it.

``--liked EXPERIMENT:ARM`` trains on the images of that A/B arm whose feedback was one of ``--events``
(default like, download, select), read from the image store (serve_config.yaml ``image_store``, where the
ingress keeps every delivered PNG for ``retention_h``), each captioned with the prompt it was made from.

``--base-model`` and ``--lora-dir`` default to the generator's ``generator_model`` and ``lora_dir`` in
serve_config.yaml, the one source of both: the adapter lands where the running service looks, and its
catalogue lists it within ``catalog_ttl_s`` (no restart); use it by name in any mix (``mydesk:0.8``) or
as an A/B arm.

The run is a Ray Train job (TorchTrainer, data through Ray Data): it joins the Ray cluster of
``RAY_ADDRESS`` (``ray job submit`` sets it; docs/CLUSTER.md) or starts a local Ray. Progress lines (step,
loss, steps/s, ETA) come from worker 0. ``--checkpoint-every N`` keeps a checkpoint every N steps in
``<runs-dir>/<name>``; after an interruption, the same command with ``--resume`` continues from the latest
one. The output is checked with the service's LoRA check before it is moved into the folder.

Prints one result line: ``adapter=NAME path=... steps=... final_loss=... seconds=... data_sha256=...``.
Exit status 0; 2 for bad input (an empty folder, an image too small or unreadable, a setting out of
bounds, a name taken): the message names the item, and nothing is written to the LoRA folder; 1 when
training itself fails.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import Any

from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.lora_training.config import LAYOUTS, LoraTrainingConfig
from deskgen.lora_training.liked import LIKED_EVENTS
from deskgen.paths import resolve
from deskgen.serve_config import app_args, load_serve_config

DEFAULT_RUNS_DIR = "build/lora-runs"


def build_parser() -> argparse.ArgumentParser:
    defaults = LoraTrainingConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(prog="python -m deskgen.train_lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--name", required=True, help="the adapter's name (its file <lora-dir>/<name>.safetensors)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a folder of images with .txt captions")
    source.add_argument("--liked", metavar="EXPERIMENT:ARM",
                        help="the images of an A/B arm that users liked (feedback --events), from the image store")  # fmt: skip
    parser.add_argument("--events", default=",".join(LIKED_EVENTS), help="feedback events that count as liked")
    parser.add_argument("--experiments-db", default=None, help="default: serve_config.yaml experiments_db")
    parser.add_argument("--image-store", default=None, help="default: serve_config.yaml image_store.dir")
    parser.add_argument("--rank", type=int, default=defaults["rank"].default)
    parser.add_argument("--alpha", type=float, default=None, help="default: the rank")
    parser.add_argument("--learning-rate", type=float, default=defaults["learning_rate"].default)
    parser.add_argument("--steps", type=int, default=defaults["steps"].default)
    parser.add_argument("--resolution", type=int, default=defaults["resolution"].default)
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    parser.add_argument("--seed", type=int, default=defaults["seed"].default)
    parser.add_argument("--text-encoders", action="store_true", help="also train LoRAs on both text encoders")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--layout", choices=LAYOUTS, default=defaults["layout"].default)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the run of this name from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter of this name")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (gradients averaged)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="checkpoints, one folder per run name")
    parser.add_argument("--base-model", default=None, help="default: serve_config.yaml generator_model")
    parser.add_argument("--lora-dir", default=None, help="default: serve_config.yaml lora_dir")
    parser.add_argument("--captioner", default=None, help="for images without captions (default: captioner_model)")
    parser.add_argument("--progress-every", type=int, default=10)
    return parser


def liked_from_args(args: argparse.Namespace, served: dict[str, Any], config: LoraTrainingConfig) -> list[Any]:
    from deskgen.experiments.store import ExperimentStore
    from deskgen.imagestore import ImageStoreSettings
    from deskgen.lora_training.liked import liked_examples

    experiment, sep, arm = str(args.liked).partition(":")
    if not (experiment and sep and arm):
        raise InvalidParameter(f"`liked` must be EXPERIMENT:ARM but is {args.liked!r}.", field="liked")
    settings = ImageStoreSettings.model_validate(served.get("image_store") or {})
    if args.image_store is not None:
        settings = settings.model_copy(update={"dir": args.image_store})
    images = settings.build()
    if images is None or not images.folder.is_dir():
        raise InvalidParameter(f"`image_store`: {settings.dir} is not a folder of kept images.", field="image_store")
    store = ExperimentStore.open(args.experiments_db or served["experiments_db"])
    events = tuple(e.strip() for e in args.events.split(",") if e.strip())
    selection = liked_examples(store, images, experiment, arm, config, events)
    print(f"# {len(selection.examples)} liked images of {experiment}:{arm} ({selection.missing} no longer kept)",
          file=sys.stderr)  # fmt: skip
    return selection.examples


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deskgen.lora_training.data import folder_examples, service_captioner
    from deskgen.lora_training.job import run_training

    served = app_args(load_serve_config())
    try:
        config = LoraTrainingConfig(
            name=args.name, base_model=args.base_model or served["generator_model"], rank=args.rank, alpha=args.alpha,
            learning_rate=args.learning_rate, steps=args.steps, resolution=args.resolution,
            batch_size=args.batch_size, seed=args.seed, train_text_encoders=args.text_encoders,
            checkpoint_every=args.checkpoint_every, layout=args.layout,
            gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        if args.progress_every < 1:
            raise InvalidParameter("`progress_every` must be at least 1.", field="progress_every")
        lora_dir = resolve(args.lora_dir or served["lora_dir"])
        # BLIP is loaded only if an image lacks its caption.
        blip = functools.cache(lambda: service_captioner(args.captioner or served["captioner_model"]))
        if args.data is not None:
            examples = folder_examples(resolve(args.data), config, lambda image: blip()(image))
        else:
            examples = liked_from_args(args, served, config)
        run = run_training(config, examples, lora_dir=lora_dir, runs_dir=resolve(args.runs_dir), resume=args.resume,
                           overwrite=args.overwrite, num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                           progress_every=args.progress_every)  # fmt: skip
    except InvalidParameter as exc:
        parser.exit(2, f"error: {exc.message}\n")
    except ModelFilesMissing as exc:
        parser.exit(2, f"error: {exc}\n")
    loss = "n/a" if run.final_loss is None else f"{run.final_loss:.6g}"
    print(f"adapter={config.name} path={run.path} steps={run.steps} final_loss={loss} seconds={run.seconds:.1f} "
          f"examples={run.examples} data_sha256={run.data_sha256}")  # fmt: skip
    print(
        f"# use it as a mix: {config.name}:0.8 (listed by GET /v1/mixes within the catalogue TTL)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
