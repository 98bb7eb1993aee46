"""The training step of an SDXL style LoRA: diffusers' models, peft's LoRA layers, plain PyTorch.

:class:`LoraTrainer` holds one SDXL base (frozen) with LoRA layers on the UNet's attention projections
(and, with ``train_text_encoders``, on both text encoders'), an AdamW optimiser over the LoRA parameters
only, and the noise schedule of the base model. One :meth:`~LoraTrainer.step` is the denoising objective
SDXL was trained with: encode the image with the VAE, add noise at a random timestep, predict it (or the
velocity, as the scheduler's ``prediction_type`` says) from the caption's embeddings of both text
encoders and SDXL's size conditioning, and take the mean squared error. :meth:`~LoraTrainer.evaluate`
is the same loss without gradients on fixed, seeded noise and timesteps, so two states of the adapter
(or the base) compare on exactly the same draws.

It runs inside a Ray Train worker (:mod:`deskgen.lora_training.job`) and alone (benchmarks, tests).
Randomness comes from CPU generators seeded from the config (LoRA init, noise, timesteps), moved to the
device, so a seed means the same draws on every device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deskgen import kohya
from deskgen.errors import ModelFilesMissing
from deskgen.lora_training.config import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraTrainingConfig
from deskgen.lora_training.data import TrainingExample, open_checked, prepare_pixels
from deskgen.paths import resolve_model_id

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
#: The seed of :meth:`LoraTrainer.evaluate`'s draws (noise, timesteps): the same for every trainer.
EVAL_SEED = 20_261_204
#: Settings a resumed run may change: train on for more steps, checkpoint at another pace.
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every"})


@dataclass(frozen=True)
class Prepared:
    """An example as tensors: pixels (3, R, R) in [-1, 1], its caption, SDXL's six size numbers."""

    pixels: Any
    caption: str
    time_ids: tuple[float, ...]


def prepare(example: TrainingExample, config: LoraTrainingConfig) -> Prepared:
    image = open_checked(example.image, example.source, config)
    pixels, (height, width), (top, left) = prepare_pixels(image, config.resolution)
    size = float(config.resolution)
    return Prepared(
        pixels, example.caption, (float(height), float(width), float(top), float(left), size, size)
    )


class LoraTrainer:
    """An SDXL base with trainable LoRA layers and their optimiser; see the module docstring."""

    def __init__(self, config: LoraTrainingConfig, *, device: str | None = None) -> None:
        import torch
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.config = config
        source = resolve_model_id(config.base_model)
        if Path(source).is_absolute() and not (Path(source) / "unet").is_dir():
            raise ModelFilesMissing("SDXL pipeline folder", source)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, config.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.tokenizers = [
            CLIPTokenizer.from_pretrained(source, subfolder=s) for s in ("tokenizer", "tokenizer_2")
        ]
        self.text_encoders = [
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=self.dtype),
            CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=self.dtype),
        ]
        # The VAE only encodes, without gradients; float32 as SDXL's VAE needs (force_upcast).
        self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=torch.float32)
        self.unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=self.dtype)
        self.scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        for model in (self.vae, self.unet, *self.text_encoders):
            model.requires_grad_(False)
            model.to(self.device)
        init = torch.random.fork_rng(devices=[])
        with init:
            torch.manual_seed(config.seed)
            # peft's own injection (transformers' add_adapter wants a newer peft than diffusers pins).
            inject_adapter_in_model(self._lora_config(LoraConfig, UNET_TARGETS), self.unet)
            if config.train_text_encoders:
                for encoder in self.text_encoders:
                    inject_adapter_in_model(self._lora_config(LoraConfig, TEXT_ENCODER_TARGETS), encoder)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders if config.train_text_encoders else ():
                encoder.gradient_checkpointing_enable()
        self.trainable = self._trainable_parameters()
        for param in self.trainable.values():
            param.data = param.data.float()  # LoRA weights train in float32 over a bfloat16 base
        self.optimizer = torch.optim.AdamW(
            list(self.trainable.values()), lr=config.learning_rate, weight_decay=1e-2
        )
        self.noise = torch.Generator().manual_seed(config.seed + 1)
        self.steps_done = 0

    def _lora_config(self, lora_config: Any, targets: tuple[str, ...]) -> Any:
        # Gaussian A, zero B: the untrained adapter is exactly the base model.
        return lora_config(r=self.config.rank, lora_alpha=self.config.effective_alpha, init_lora_weights="gaussian",
                           target_modules=list(targets))  # fmt: skip

    def _components(self) -> dict[str, Any]:
        parts = {"unet": self.unet}
        if self.config.train_text_encoders:
            parts.update(zip(TEXT_ENCODERS, self.text_encoders, strict=True))
        return parts

    def _trainable_parameters(self) -> dict[str, Any]:
        return {
            f"{component}.{name}": param
            for component, model in self._components().items()
            for name, param in model.named_parameters()
            if param.requires_grad
        }

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable.values())

    # -- the objective ----------------------------------------------------------------------------

    def encode_prompts(self, captions: list[str]) -> tuple[Any, Any]:
        """SDXL's conditioning: both encoders' penultimate hidden states, concatenated, and the second
        encoder's pooled projection (as StableDiffusionXLPipeline.encode_prompt computes them)."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def loss(self, batch: list[Prepared], generator: Any) -> Any:
        """The denoising loss of one batch, with noise and timesteps drawn from ``generator`` (CPU)."""
        import torch
        import torch.nn.functional as F

        pixels = torch.stack([p.pixels for p in batch]).to(self.device, torch.float32)
        with torch.no_grad():
            dist = self.vae.encode(pixels).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator).to(self.device)
            latents = ((dist.mean + dist.std * eps) * self.vae.config.scaling_factor).to(self.dtype)
        noise = torch.randn(latents.shape, generator=generator).to(self.device, self.dtype)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(batch),), generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_text_encoders):
            prompt_embeds, pooled = self.encode_prompts([p.caption for p in batch])
        time_ids = torch.tensor([p.time_ids for p in batch], device=self.device, dtype=self.dtype)
        pred = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                         return_dict=False)[0]  # fmt: skip
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    def step(self, batch: list[Prepared], *, sync: Callable[[], None] | None = None) -> float:
        """One optimiser step on ``batch``; returns its loss. ``sync`` runs between the backward pass and
        the update (the job averages the gradients of several workers there)."""
        import torch

        for model in self._components().values():
            model.train()
        loss = self.loss(batch, self.noise)
        loss.backward()
        if sync is not None:
            sync()
        torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return float(loss.detach())

    def evaluate(self, examples: list[Prepared], draws: int = 4) -> float:
        """The mean loss over ``examples`` x ``draws`` fixed draws (seeded by :data:`EVAL_SEED`), no gradients."""
        import torch

        for model in self._components().values():
            model.eval()
        generator = torch.Generator().manual_seed(EVAL_SEED)
        total = 0.0
        with torch.no_grad():
            for _ in range(draws):
                for example in examples:
                    total += float(self.loss([example], generator))
        return total / (draws * len(examples))

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "lora": {name: p.detach().cpu().clone() for name, p in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "noise": self.noise.get_state(),
            "steps_done": self.steps_done,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        mine = self.config.to_dict()
        changed = sorted(k for k in state["config"] if k not in RESUMABLE_CHANGES and state["config"][k] != mine.get(k))
        if changed:
            raise ValueError(f"the checkpoint was written with other settings ({', '.join(changed)})")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise"])
        self.steps_done = int(state["steps_done"])

    # -- the output -------------------------------------------------------------------------------

    def lora_factors(self) -> dict[str, dict[str, tuple[Any, Any]]]:
        """component -> module name (as LoRA files spell it) -> (A [r, in], B [out, r]), float32 on the CPU."""
        from peft.utils import get_peft_model_state_dict

        factors: dict[str, dict[str, tuple[Any, Any]]] = {}
        for component, model in self._components().items():
            state = get_peft_model_state_dict(model)
            modules = sorted(k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight"))
            factors[component] = {
                kohya.file_module_name(component, m): (
                    state[f"{m}.lora_A.weight"].detach().float().cpu().contiguous(),
                    state[f"{m}.lora_B.weight"].detach().float().cpu().contiguous(),
                )
                for m in modules
            }
        return factors

    def lora_tensors(self) -> dict[str, Any]:
        """The adapter as the tensors of a LoRA file in the config's layout.

        diffusers: ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` with alpha / rank folded into
        B (diffusers then loads it at scale 1, whatever alpha the run used). kohya_ss: ``lora_down`` = A,
        ``lora_up`` = B and a 0-d ``alpha`` per module (kohya scales by alpha / rank)."""
        import torch

        tensors: dict[str, Any] = {}
        layers = int(self.unet.config.layers_per_block)
        for component, modules in self.lora_factors().items():
            for module, (a, b) in modules.items():
                if self.config.layout == "kohya":
                    key = kohya.module_key(component, module, layers)
                    tensors[key + kohya.DOWN] = a
                    tensors[key + kohya.UP] = b
                    tensors[key + kohya.ALPHA] = torch.tensor(self.config.effective_alpha)
                else:
                    tensors[f"{component}.{module}.lora_A.weight"] = a
                    tensors[f"{component}.{module}.lora_B.weight"] = (b * self.config.scale).contiguous()
        return tensors
