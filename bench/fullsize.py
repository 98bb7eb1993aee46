"""Full-size production architectures with random weights, built offline from public config values.

    python -m bench.fullsize --out DIR [--only sdxl,loras,blip,vgg] [--device cuda] [--force]

Writes (each part ends with a ``.complete`` marker, so a finished part is not rebuilt):

    DIR/sdxl/                  StableDiffusionXLPipeline folder, fp16 safetensors (~7 GB): the SDXL-base
                               UNet (2,567,463,684 params), VAE (83,653,863), CLIP ViT-L/14 text encoder
                               (123,060,480) and OpenCLIP bigG text encoder with projection (694,659,840),
                               EulerDiscreteScheduler with SDXL's settings, code-built CLIP tokenizers
    DIR/loras/{dalle,ott,3d}.safetensors
                               rank-32 LoRAs in kohya_ss layout (SGM block numbering, lora_te1_/lora_te2_) on
                               every attention projection of the UNet (560 modules) and of both text
                               encoders (176 modules), fp16, ~120 MB each
    DIR/blip/                  BLIP-base captioning folder (``BlipConfig()`` defaults: 223,971,644 params, fp32)
                               with its image processor and a BERT tokenizer of BLIP's 30,524 ids
    DIR/classifier/desk_gate.keras
                               Keras VGG16 (``weights=None``, no top) + the deskgen head
                               (:func:`deskgen.classifier.build_gate_model`)

Timings measured on these are real; the images they produce are noise. Nothing is downloaded. The
models are built directly on ``--device`` (default: cuda when available) in their storage dtype, so
SDXL needs ~7 GB of device memory (or CPU RAM) to build instead of the ~14 GB of an fp32 init.
Every part is seeded. Use a folder outside the repository (default ``/tmp/deskgen-fullsize``).

Measured on the 2-core CPU machine (shared): sdxl 71 s (peak RSS 7.6 GB), loras 21 s, blip 15 s,
vgg 8 s. The SDXL folder loads through ``DeskGenerator.from_pretrained`` and the three LoRAs through
``ensure_adapters`` (736 of 736 layers each); fp16 outputs are finite.

One file (~500 lines): the builders of the four full-size architectures share the meta-device and
parameter-count helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from bench.common import DEFAULT_FULLSIZE_DIR, parse_choices
from deskgen import kohya
from deskgen.devices import is_cuda
from deskgen.errors import InvalidParameter
from deskgen.paths import PROJECT_ROOT

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PARTS = ("sdxl", "loras", "blip", "vgg")
COMPLETE_MARKER = ".complete"
SEED = 2024

# --------------------------------------------------------------------------------------------------
# Public config values (stabilityai/stable-diffusion-xl-base-1.0 and Salesforce/blip-image-captioning-base)
# --------------------------------------------------------------------------------------------------

#: unet/config.json of SDXL base 1.0 (Fluently-XL-v2 is a fine-tune with the same architecture).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' (historical) name for the number of heads
    "cross_attention_dim": 2048,  # 768 (CLIP-L) + 1280 (bigG) hidden states, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 micro-conditioning + 1280 pooled text
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

#: vae/config.json of SDXL base 1.0.
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_POSITIONS = 77
#: text_encoder/config.json (OpenAI CLIP ViT-L/14 text tower).
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
#: text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower, with its 1280x1280 projection).
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

#: scheduler/scheduler_config.json of SDXL base 1.0.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}

#: BLIP-base's BERT vocabulary: 30,522 BERT ids + [DEC] (30522, the decoder's bos) + [ENC] (30523).
BLIP_VOCAB_SIZE = 30524
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
BLIP_DEC_ID, BLIP_ENC_ID = 30522, 30523

#: Parameter counts of the published checkpoints; a build that differs fails.
EXPECTED_PARAMS: dict[str, int] = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "blip": 223_971_644,
    # VGG16 without top (14,714,688) + GAP -> Dense(256) -> Dense(1).
    "vgg": 14_714_688 + 512 * 256 + 256 + 256 + 1,
}

# LoRAs: rank 32 with alpha 16 is a common kohya setting for SDXL style LoRAs.
LORA_RANK = 32
LORA_ALPHA = 16.0
#: Multiplier on the up weights. With alpha/rank = 0.5 each adapted projection moves by ~10% of its
#: input's scale: a visible but bounded change, so fp16 activations stay finite with several adapters.
LORA_STRENGTH = 0.2
LORA_SEEDS: dict[str, int] = {"dalle": 101, "ott": 202, "3d": 303}


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def init_on(device: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (``meta`` allocates nothing)."""
    import torch

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def build_tokenizer() -> Any:
    """The code-built CLIP BPE tokenizer of the tiny SDXL (:func:`deskgen.tools.tiny_sdxl.build_tokenizer`).

    Its ids are far below :data:`CLIP_VOCAB_SIZE`; the text encoders keep the full 49,408-row embedding
    tables, and their bos/eos/pad ids are set to this tokenizer's (CLIP pools at the first eos)."""
    from deskgen.tools.tiny_sdxl import build_tokenizer as tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    if len(tokenizer) > CLIP_VOCAB_SIZE:
        raise RuntimeError(f"the code-built tokenizer has {len(tokenizer)} ids, more than CLIP's {CLIP_VOCAB_SIZE}")
    return tokenizer


def text_encoder_configs(tokenizer: Any) -> tuple[Any, Any]:
    """(CLIP-L, bigG) ``CLIPTextConfig``s at full size, with ``tokenizer``'s special ids."""
    from transformers import CLIPTextConfig

    special = {
        "vocab_size": CLIP_VOCAB_SIZE,
        "max_position_embeddings": CLIP_MAX_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPTextConfig(**TEXT_ENCODER_CONFIG, **special), CLIPTextConfig(**TEXT_ENCODER_2_CONFIG, **special)


def build_sdxl_components(device: str = "meta", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The SDXL pipeline's components (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``,
    ``tokenizer``, ``tokenizer_2``, ``scheduler``), seeded, created on ``device`` in ``dtype``.

    ``device="meta"`` builds the architecture only (no memory, well under a second)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    te1_config, te2_config = text_encoder_configs(tokenizer)
    with init_on(device, dtype):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_encoder = CLIPTextModel(te1_config)
        text_encoder_2 = CLIPTextModelWithProjection(te2_config)
    models: tuple[Any, ...] = (unet, vae, text_encoder, text_encoder_2)
    for model in models:
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    }


def check_param_counts(components: dict[str, Any]) -> dict[str, int]:
    """Parameter count of each model component; raises RuntimeError if one differs from :data:`EXPECTED_PARAMS`."""
    counts = {}
    for name, model in components.items():
        if name not in EXPECTED_PARAMS:
            continue
        counts[name] = count_params(model)
        if counts[name] != EXPECTED_PARAMS[name]:
            raise RuntimeError(f"{name}: {counts[name]:,} parameters, expected {EXPECTED_PARAMS[name]:,}")
    return counts


def build_sdxl(out: Path, *, device: str, dtype: str = "float16") -> dict[str, int]:
    """Write the full-size SDXL pipeline to ``out`` (fp16 safetensors by default); returns param counts."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    components = build_sdxl_components(device, getattr(torch, dtype))
    counts = check_param_counts(components)
    pipe: Any = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return counts


# --------------------------------------------------------------------------------------------------
# LoRAs in kohya_ss layout
# --------------------------------------------------------------------------------------------------


def lora_targets(components: dict[str, Any]) -> dict[str, dict[str, tuple[int, int]]]:
    """component -> {module: (in_features, out_features)}: every UNet transformer-block attention
    projection (to_q/to_k/to_v/to_out.0) and every text-encoder self-attention projection."""
    from deskgen.tools.tiny_sdxl import lora_targets as attention_targets

    return attention_targets(SimpleNamespace(**components))


def kohya_key_shapes(
    targets: dict[str, dict[str, tuple[int, int]]], *, rank: int = LORA_RANK, layers_per_block: int = 2
) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a kohya LoRA over ``targets`` -> its shape (``()`` for alphas)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for component, modules in targets.items():
        for name in sorted(modules):
            in_f, out_f = modules[name]
            key = kohya.module_key(component, name, layers_per_block)
            shapes[key + kohya.DOWN] = (rank, in_f)
            shapes[key + kohya.UP] = (out_f, rank)
            shapes[key + kohya.ALPHA] = ()
    return shapes


def random_kohya_lora(
    targets: dict[str, dict[str, tuple[int, int]]],
    seed: int,
    *,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    strength: float = LORA_STRENGTH,
    dtype: str = "float16",
) -> dict[str, torch.Tensor]:
    """A seeded kohya state dict over ``targets``: down ~ N(0, 1/in), up ~ strength * N(0, 1/rank).

    Drawn with NumPy's PCG64 generator on the CPU (several times faster than torch's CPU generator for
    these ~60 M values), so every machine writes the same bytes."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    torch_dtype = getattr(torch, dtype)
    out: dict[str, torch.Tensor] = {}
    for key, shape in kohya_key_shapes(targets, rank=rank).items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(alpha, dtype=torch_dtype)
            continue
        scale = 1 / math.sqrt(shape[1]) if key.endswith(".lora_down.weight") else strength / math.sqrt(rank)
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        # Cast in NumPy when it can: its fp16 cast is vectorised, torch's CPU cast was ~5x slower here.
        if dtype in ("float16", "float32"):
            out[key] = torch.from_numpy(values.astype(dtype))
        else:
            out[key] = torch.from_numpy(values).to(torch_dtype)
    return out


def build_loras(out: Path, names: Iterable[str] = tuple(LORA_SEEDS)) -> dict[str, int]:
    """Write ``out/<name>.safetensors`` for each style; returns the number of adapted modules per file.

    The targets come from the SDXL architecture built on the meta device (no memory)."""
    from safetensors.torch import save_file

    targets = lora_targets(build_sdxl_components("meta"))
    out.mkdir(parents=True, exist_ok=True)
    modules = {}
    for name in names:
        state = random_kohya_lora(targets, LORA_SEEDS[name])
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(LORA_RANK),
            "ss_network_alpha": str(LORA_ALPHA),
            "ss_base_model_version": "sdxl_base_v1-0",
        }
        save_file(state, str(out / f"{name}.safetensors"), metadata=metadata)
        modules[name] = sum(1 for k in state if k.endswith(".lora_down.weight"))
    return modules


# --------------------------------------------------------------------------------------------------
# BLIP-base and the VGG16 gate
# --------------------------------------------------------------------------------------------------


def blip_vocabulary() -> dict[str, int]:
    """A BERT-shaped vocabulary of exactly :data:`BLIP_VOCAB_SIZE` ids: BERT's special ids, the tiny
    BLIP's words (so prefixes tokenize to real words), ``[unusedN]`` fillers, then [DEC] and [ENC]."""
    from deskgen.prompts.captions import DEFAULT_PREFIXES
    from deskgen.prompts.vocabulary import DESK_VOCABULARY
    from deskgen.tools.tiny_blip import COMMON_WORDS, PUNCTUATION

    words: list[str] = [*PUNCTUATION, *COMMON_WORDS]
    for term in DESK_VOCABULARY:
        words.extend(term.lower().replace("-", " - ").split())
    for prefix in DEFAULT_PREFIXES:
        words.extend(prefix.lower().replace(":", " ").replace("?", " ").replace("_", " ").split())
    by_id: dict[int, str] = {i: t for t, i in BERT_SPECIAL_IDS.items()}
    free = (i for i in range(BLIP_DEC_ID) if i not in by_id and i > max(BERT_SPECIAL_IDS.values()))
    for word in dict.fromkeys(words):  # ordered, unique
        if word not in by_id.values():
            by_id[next(free)] = word
    for i in range(BLIP_DEC_ID):
        by_id.setdefault(i, f"[unused{i}]")
    by_id[BLIP_DEC_ID], by_id[BLIP_ENC_ID] = "[DEC]", "[ENC]"
    return {token: i for i, token in sorted(by_id.items())}


def blip_config() -> Any:
    """``BlipConfig()`` (= BLIP-base: ViT-B/16 at 384 px, BERT-base decoder), vision init at std 0.02."""
    from transformers import BlipConfig

    # BlipVisionConfig's initializer_range 1e-10 suits loading trained weights; random ones at that scale
    # make the ViT's output (and so its numerics) degenerate.
    return BlipConfig(vision_config={"initializer_range": 0.02})


def build_blip(out: Path, *, device: str) -> int:
    """Write a BLIP-base captioning folder (fp32) with processor + tokenizer; returns the param count."""
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    vocab = blip_vocabulary()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    config = blip_config()
    text = config.text_config
    for name, expected in (("pad", text.pad_token_id), ("sep", text.sep_token_id), ("bos", text.bos_token_id)):
        if getattr(tokenizer, f"{name}_token_id") != expected:
            raise RuntimeError(f"BLIP tokenizer {name} id {getattr(tokenizer, f'{name}_token_id')} != config {expected}")
    torch.manual_seed(SEED)
    with init_on(device, torch.float32):
        model = BlipForConditionalGeneration(config).eval()
    params = count_params(model)
    if params != EXPECTED_PARAMS["blip"]:
        raise RuntimeError(f"BLIP: {params:,} parameters, expected {EXPECTED_PARAMS['blip']:,}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # BlipImageProcessorPil's defaults are BLIP-base's: 384x384, OpenAI CLIP mean/std.
    BlipProcessor(image_processor=BlipImageProcessorPil(), tokenizer=tokenizer).save_pretrained(out)
    return params


def build_vgg(path: Path) -> int:
    """Write the full-size gate (VGG16 ``weights=None`` + head, 224 px) as ``.keras``; returns its param count."""
    from deskgen.classifier import build_gate_model, import_keras

    keras = import_keras()
    keras.utils.set_random_seed(SEED)
    model = build_gate_model("vgg16", "none")
    params = int(model.count_params())
    if params != EXPECTED_PARAMS["vgg"]:
        raise RuntimeError(f"VGG16 gate: {params:,} parameters, expected {EXPECTED_PARAMS['vgg']:,}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return params


# --------------------------------------------------------------------------------------------------
# Layout and CLI
# --------------------------------------------------------------------------------------------------


def part_dir(out: Path, part: str) -> Path:
    """Where ``part`` lives under ``out`` (its ``.complete`` marker is inside)."""
    return out / {"sdxl": "sdxl", "loras": "loras", "blip": "blip", "vgg": "classifier"}[part]


def vgg_path(out: Path) -> Path:
    return part_dir(out, "vgg") / "desk_gate.keras"


def is_built(out: Path, part: str) -> bool:
    return (part_dir(out, part) / COMPLETE_MARKER).is_file()


def check_out_dir(out: Path) -> Path:
    """``out`` resolved; refuses the repository (gigabytes of random weights do not belong in git)."""
    resolved = out.expanduser().resolve()
    if resolved == PROJECT_ROOT or resolved.is_relative_to(PROJECT_ROOT):
        raise InvalidParameter(
            f"`--out` must be outside the repository {PROJECT_ROOT} but is {str(resolved)!r}.", field="out"
        )
    return resolved


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build(out: Path, parts: Iterable[str] = PARTS, *, device: str | None = None, force: bool = False) -> dict[str, float]:
    """Build ``parts`` into ``out`` (skipping finished ones unless ``force``); returns seconds per built part."""
    import shutil

    out = check_out_dir(Path(out))
    device = device or default_device()
    timings: dict[str, float] = {}
    for part in parts:
        target = part_dir(out, part)
        if is_built(out, part) and not force:
            log.info("full-size %s already in %s", part, target)
            continue
        if target.exists():
            shutil.rmtree(target)
        start = time.perf_counter()
        if part == "sdxl":
            info: object = build_sdxl(target, device=device)
        elif part == "loras":
            info = build_loras(target)
        elif part == "blip":
            info = build_blip(target, device=device)
        else:
            info = build_vgg(vgg_path(out))
        (target / COMPLETE_MARKER).write_text("ok\n")
        timings[part] = time.perf_counter() - start
        log.info("built full-size %s in %.1f s on %s: %s", part, timings[part], device, info)
        if is_cuda(device):
            import torch

            torch.cuda.empty_cache()
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_FULLSIZE_DIR, help=f"output folder (default {DEFAULT_FULLSIZE_DIR})")
    parser.add_argument("--only", default=None, help=f"comma-separated parts of {','.join(PARTS)} (default: all)")
    parser.add_argument("--device", default=None, help="build on this torch device (default: cuda if available, else cpu)")
    parser.add_argument("--force", action="store_true", help="rebuild parts that are already complete")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    timings = build(args.out, parse_choices(args.only, PARTS, option="--only"), device=args.device, force=args.force)
    print(f"full-size models in {check_out_dir(args.out)}: " + (", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) or "already built"))


if __name__ == "__main__":
    main()
