"""The LoRA training job on Ray Train: a TorchTrainer whose workers run :class:`LoraTrainer`, fed by Ray Data.

The driver (:func:`run_training`) checks everything first (config, data, destination: a bad item is an
InvalidParameter before Ray starts anything), puts the examples into a Ray Data dataset and starts a
:class:`ray.train.torch.TorchTrainer`. Each worker (:func:`train_loop`) reads its shard once, prepares
the images (decode, resize, crop), and steps through them in a seeded order, epoch after epoch, until
``steps``; with several workers the LoRA gradients are averaged across them (all-reduce) before each
optimiser step. Worker 0 prints progress (step, loss, steps/s, ETA) every ``progress_every`` steps and
reports a checkpoint (the trainer's state: LoRA weights, optimiser, noise generator, step) every
``checkpoint_every`` steps and at the end, into the run's folder ``<runs_dir>/<name>``.

Resume: run again with the same name and ``runs_dir`` and ``resume=True``: Ray Train hands the worker
the run's latest checkpoint (``ray.train.get_checkpoint``) and training continues from its step with the
same optimiser state and noise draws. The final checkpoint's adapter is written into ``lora_dir`` by the
driver (:func:`deskgen.lora_training.output.write_lora`), where the catalogue lists it within its TTL.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskgen.errors import InvalidParameter
from deskgen.lora_training.config import LoraTrainingConfig
from deskgen.lora_training.data import TrainingExample, data_sha256
from deskgen.lora_training.output import check_destination, training_metadata, write_lora

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter.safetensors"
PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class TrainingRun:
    """What a finished run produced."""

    path: Path
    steps: int
    final_loss: float | None
    seconds: float
    checkpoint: str
    data_sha256: str
    examples: int


def _order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def train_loop(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker: see the module docstring."""
    import ray.train
    import torch
    import torch.distributed as dist

    from deskgen.lora_training.trainer import LoraTrainer, prepare

    config = LoraTrainingConfig.from_dict(loop_config["config"])
    progress_every = int(loop_config.get("progress_every", 10))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = "cuda" if torch.cuda.is_available() and loop_config.get("use_gpu") else "cpu"
    trainer = LoraTrainer(config, device=device)
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    batch_source = [prepare(TrainingExample.from_row(row), config) for row in rows]
    if not batch_source:
        raise RuntimeError(f"worker {rank} received no training examples (more workers than examples?)")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / STATE_FILE, weights_only=False))
        if rank == 0:
            print(f"resumed at step {trainer.steps_done}/{config.steps}", flush=True)

    sync: Callable[[], None] | None = None
    if world > 1:

        def sync() -> None:  # average the LoRA gradients over the workers (DDP for the trainable set only)
            for param in trainer.trainable.values():
                if param.grad is not None:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)

    def save(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="deskgen-lora-ckpt-") as folder:
            if rank == 0:
                from safetensors.torch import save_file

                torch.save(trainer.state_dict(), Path(folder) / STATE_FILE)
                save_file(trainer.lora_tensors(), str(Path(folder) / ADAPTER_FILE))
                (Path(folder) / PROGRESS_FILE).write_text(json.dumps(metrics))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)

    started, first_step = time.perf_counter(), trainer.steps_done
    losses: list[float] = []
    per_epoch = max(1, -(-len(batch_source) // config.batch_size))
    while trainer.steps_done < config.steps:
        epoch, index = divmod(trainer.steps_done, per_epoch)
        order = _order(len(batch_source), config.seed + rank, epoch)
        batch = [batch_source[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]
        losses.append(trainer.step(batch, sync=sync))
        done = trainer.steps_done
        if rank == 0 and (done % progress_every == 0 or done == config.steps):
            rate = (done - first_step) / max(time.perf_counter() - started, 1e-9)
            recent = losses[-progress_every:]
            print(
                f"step {done}/{config.steps} loss {losses[-1]:.4f} (mean of last {len(recent)}: "
                f"{sum(recent) / len(recent):.4f}) {rate:.2f} steps/s ETA {(config.steps - done) / rate:.0f} s",
                flush=True,
            )
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            save({"step": done, "loss": losses[-1], "final": False})
    final_loss = sum(losses[-progress_every:]) / len(losses[-progress_every:]) if losses else None
    save({"step": trainer.steps_done, "loss": final_loss, "final": True})


def run_training(
    config: LoraTrainingConfig,
    examples: Sequence[TrainingExample],
    *,
    lora_dir: Path,
    runs_dir: Path,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    progress_every: int = 10,
    max_failures: int = 2,
) -> TrainingRun:
    """Train on ``examples`` with Ray Train (connecting to the running Ray, or starting a local one) and
    write the adapter into ``lora_dir``. Raises InvalidParameter for bad input before anything starts."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    if not examples:
        raise InvalidParameter("`data`: no training examples.", field="data")
    check_destination(lora_dir, config.name, overwrite=overwrite)
    if not 1 <= num_workers <= len(examples):
        raise InvalidParameter(
            f"`workers` must be from 1 to the number of examples ({len(examples)}) but is {num_workers}.",
            field="workers",
        )
    run_folder = runs_dir / config.name
    if run_folder.exists() and not resume:
        raise InvalidParameter(
            f"`name`: a training run {config.name!r} exists in {runs_dir}; resume it (--resume) or remove {run_folder}.",
            field="name",
        )
    if resume and not run_folder.exists():
        raise InvalidParameter(
            f"`resume`: no training run {config.name!r} in {runs_dir} to resume.", field="resume"
        )
    runs_dir.mkdir(parents=True, exist_ok=True)
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    dataset = ray.data.from_items([e.as_row() for e in examples])
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "progress_every": progress_every, "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=str(runs_dir.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # A worker that dies is restarted from the last checkpoint (twice); a worker group that cannot
            # be placed (no free CPU/GPU for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s) fails the run
            # after three tries instead of waiting for ever.
            # (ray.train.FailureConfig is Train V2's at run time; mypy reads Train V1's, without the limit.)
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=2),  # type: ignore[call-arg]
        ),
        datasets={"train": dataset},
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("the training run reported no checkpoint")
    from safetensors.torch import load

    with checkpoint.as_directory() as folder:
        progress = json.loads((Path(folder) / PROGRESS_FILE).read_text())
        tensors = load((Path(folder) / ADAPTER_FILE).read_bytes())
    digest = data_sha256(examples)
    metadata = training_metadata(config, data_sha256=digest, examples=len(examples), steps=int(progress["step"]),
                                 final_loss=progress.get("loss"))  # fmt: skip
    path = write_lora(tensors, metadata, lora_dir, config.name, overwrite=overwrite)
    return TrainingRun(path=path, steps=int(progress["step"]), final_loss=progress.get("loss"),
                       seconds=time.perf_counter() - started, checkpoint=checkpoint.path, data_sha256=digest,
                       examples=len(examples))  # fmt: skip
