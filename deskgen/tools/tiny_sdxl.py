"""A tiny, randomly initialised SDXL pipeline and three tiny style LoRAs, built offline in seconds.

    build(out)  ->  out/sdxl/                    StableDiffusionXLPipeline.save_pretrained folder
                    out/loras/dalle.safetensors  kohya_ss layout (SGM block numbering, lora_te1_/lora_te2_)
                    out/loras/3d.safetensors     kohya_ss layout
                    out/loras/ott.safetensors    diffusers/peft layout (StableDiffusionXLPipeline.save_lora_weights)

The pipeline keeps SDXL's architecture at toy widths: the UNet has SDXL's block layout (Down, CrossAttnDown,
CrossAttnDown and the mirrored up blocks, ``layers_per_block=2`` so kohya's SGM numbering maps onto it the
way it maps onto the real UNet), ``addition_embed_type="text_time"`` and linear projections; the VAE has 4
levels, so the latent scale factor is 8 as in the real one; two CLIP text encoders (the second with a
projection, pooled into the time embedding) with byte-level BPE tokenizers learned in code from a small
corpus. The LoRAs have non-zero up *and* down weights, large enough that switching mixes visibly changes
a 64x64 image. Everything is seeded, so two builds write identical tensors.

:func:`build` ends with :func:`verify`, which reloads the folder through ``from_pretrained`` and
``load_lora_weights`` and checks that every module written into each LoRA file arrived, with its weights,
in the pipeline, and that each LoRA changes the image: a conversion that silently drops keys fails the build.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskgen import kohya

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SEED = 1234
LORA_RANK = 4
#: kohya scales a LoRA by alpha / rank; alpha != rank exercises that path.
KOHYA_ALPHA = 2.0
#: diffusers-layout files carry a LoraConfig in their metadata; lora_alpha != r exercises it.
DIFFUSERS_ALPHA = 2
#: Multiplier on the LoRA up weights; chosen so one adapter at weight 1 moves a 64x64, 2-step image by
#: about 20 grey levels on average (measured by :func:`verify`): a switch is visible by eye.
LORA_STRENGTH = 4.0
#: :func:`verify` fails a build whose LoRAs move the image by less than this (grey levels, mean).
MIN_VISIBLE_CHANGE = 5.0
#: name -> (layout, seed). Different seeds give each style a different direction.
LORAS: dict[str, tuple[str, int]] = {"dalle": ("kohya", 11), "ott": ("diffusers", 22), "3d": ("kohya", 33)}

UNET_ATTN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

# A small corpus of desk-setup and style words; the tokenizers learn their merges from it, so prompts
# about desks tokenize into a few tokens per word, as with the real CLIP vocabulary.
CORPUS = """
a photo of a desk setup with a monitor keyboard mouse lamp plant and a chair in a bright room
a minimal workspace with a laptop on a wooden desk next to a window with natural light
a cozy gaming setup with rgb lights two monitors a mechanical keyboard and headphones
a modern home office with a standing desk a white wall shelves books and a coffee mug
a clean desk with a computer speakers a microphone a webcam cables and a desk mat
an illustration of a desk in the style of dalle digital art vibrant colors soft shadows
an over the top maximalist desk setup neon lights posters figures and many gadgets
a 3d render of a desk setup isometric low poly clay render blender octane soft lighting
high quality detailed sharp focus professional photography studio lighting realistic
blurry low quality noisy distorted deformed bad proportions text watermark messy cluttered
background cartoon anime painting sketch wood metal glass black white gray green blue red
""".split()

_SPECIAL_BOS = "<|startoftext|>"
_SPECIAL_EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def learn_bpe(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` BPE merges (CLIP style: the last symbol of a word carries ``</w>``)."""
    byte_map = _bytes_to_unicode()
    counts = collections.Counter(words)
    vocab: dict[tuple[str, ...], int] = {}
    for word, count in counts.items():
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        vocab[tuple(chars)] = count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in vocab.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        # Ties broken by the pair itself so the merges do not depend on dict order.
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        vocab = merged
    return merges


def build_tokenizer(num_merges: int = 300) -> Any:
    """A CLIPTokenizer with CLIP's vocabulary layout (bytes, bytes+``</w>``, merges, specials)."""
    from transformers import CLIPTokenizer

    merges = learn_bpe(CORPUS, num_merges)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges]
    tokens += [_SPECIAL_BOS, _SPECIAL_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    # model_max_length must be 77: the default (~1e30) would make the pipeline pad prompts to it.
    return CLIPTokenizer(
        vocab=vocab,
        # The tokenizers backend wants (a, b) tuples; transformers' annotation says list[str].
        merges=merges,  # type: ignore[arg-type]
        model_max_length=77,
        bos_token=_SPECIAL_BOS,
        eos_token=_SPECIAL_EOS,
        pad_token=_SPECIAL_EOS,
        unk_token=_SPECIAL_EOS,
    )


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


def build_pipeline() -> Any:
    """The tiny StableDiffusionXLPipeline (fp32, CPU, seeded)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        # CLIP pools the hidden state at the first eos token; the ids must match the tokenizer's.
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "num_hidden_layers": 2,  # the pipeline reads hidden_states[-2], as SDXL's clip skip
    }
    te1_hidden, te2_hidden, pooled_dim = 32, 48, 32
    te1_cfg = CLIPTextConfig(hidden_size=te1_hidden, intermediate_size=64, num_attention_heads=4, projection_dim=pooled_dim, **special)
    te2_cfg = CLIPTextConfig(hidden_size=te2_hidden, intermediate_size=96, num_attention_heads=4, projection_dim=pooled_dim, **special)
    text_encoder = CLIPTextModel(te1_cfg)
    text_encoder_2 = CLIPTextModelWithProjection(te2_cfg)

    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=2,  # as SDXL: kohya's SGM numbering (input_blocks.{1+3i+j}) assumes it
        norm_num_groups=8,
        attention_head_dim=(1, 2, 4),  # diffusers' name for the number of heads, as in SDXL's config
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=te1_hidden + te2_hidden,  # the two encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding.
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 levels: latent scale factor 8
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


# --------------------------------------------------------------------------------------------------
# LoRAs
# --------------------------------------------------------------------------------------------------


def lora_targets(pipe: Any) -> dict[str, dict[str, tuple[int, int]]]:
    """component -> {module name: (in_features, out_features)} of every attention projection a LoRA targets."""
    import torch

    targets: dict[str, dict[str, tuple[int, int]]] = {}
    for component, suffixes in (
        ("unet", UNET_ATTN_PROJECTIONS),
        ("text_encoder", TE_ATTN_PROJECTIONS),
        ("text_encoder_2", TE_ATTN_PROJECTIONS),
    ):
        found: dict[str, tuple[int, int]] = {}
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + s for s in suffixes)):
                if component == "unet" and ".transformer_blocks." not in name:
                    continue
                found[name] = (module.in_features, module.out_features)
        targets[component] = found
    return targets


def _random_lora(
    targets: dict[str, dict[str, tuple[int, int]]], seed: int
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """component -> module -> (down [r, in], up [out, r]), both non-zero, seeded."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for component, modules in targets.items():
        weights[component] = {}
        for name in sorted(modules):
            in_f, out_f = modules[name]
            # Scaled like the base layer's init so the delta is comparable to the weight it perturbs.
            down = torch.randn(LORA_RANK, in_f, generator=gen) / in_f**0.5
            up = LORA_STRENGTH * torch.randn(out_f, LORA_RANK, generator=gen) / LORA_RANK**0.5
            weights[component][name] = (down.contiguous(), up.contiguous())
    return weights


def _write_kohya(path: Path, weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for component, modules in weights.items():
        for name, (down, up) in modules.items():
            key = kohya.module_key(component, name, layers)
            # kohya alphas are stored as 0-d tensors; its trainers save fp16 weights, we keep fp32.
            tensors[key + kohya.DOWN] = down
            tensors[key + kohya.UP] = up
            tensors[key + kohya.ALPHA] = torch.tensor(KOHYA_ALPHA)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK)})


def _write_diffusers(path: Path, weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    from diffusers import StableDiffusionXLPipeline

    layers: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for component, modules in weights.items():
        layers[component] = {}
        for name, (down, up) in modules.items():
            file_name = kohya.file_module_name(component, name)
            layers[component][f"{file_name}.lora_A.weight"] = down
            layers[component][f"{file_name}.lora_B.weight"] = up
        # As diffusers' SDXL LoRA training scripts write it: short target names, matched by suffix.
        targets = UNET_ATTN_PROJECTIONS if component == "unet" else TE_ATTN_PROJECTIONS
        metadata[component] = {"r": LORA_RANK, "lora_alpha": DIFFUSERS_ALPHA, "target_modules": list(targets)}
    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent),
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        weight_name=path.name,
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"],
    )


def _canonicalise_header(path: Path) -> None:
    """Rewrite a .safetensors header with sorted keys, so a rebuild is byte-identical.

    safetensors serialises ``__metadata__`` from a Rust HashMap, whose order changes per process; the
    adapters' sha256 goes into every image's metadata, so it should not change between identical builds.
    Tensor offsets are relative to the end of the header, so re-serialising the header is safe.
    """
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 with spaces
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def expected_weights(pipe: Any) -> dict[str, dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """LoRA name -> the (down, up) weights :func:`build` writes for every targeted module (recomputed from seeds)."""
    targets = lora_targets(pipe)
    return {name: _random_lora(targets, seed) for name, (_, seed) in LORAS.items()}


# --------------------------------------------------------------------------------------------------
# Build and verify
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block. Tiny models gain nothing from more, and on a busy
    machine (2 cores shared with other jobs) two OpenMP threads made a 64x64 generation ~50x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build(out: Path) -> None:
    """Write ``out/sdxl`` and ``out/loras/{dalle,ott,3d}.safetensors``, then :func:`verify` them."""
    with one_torch_thread():
        _build(Path(out))


def _build(out: Path) -> None:
    pipe = build_pipeline()
    pipe.save_pretrained(str(out / "sdxl"))
    lora_dir = out / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    layers = pipe.unet.config.layers_per_block
    for name, weights in expected_weights(pipe).items():
        layout = LORAS[name][0]
        path = lora_dir / f"{name}.safetensors"
        if layout == "kohya":
            _write_kohya(path, weights, layers)
        else:
            _write_diffusers(path, weights)
        _canonicalise_header(path)
    verify(out)


def verify(out: Path, *, size: int = 64, steps: int = 2) -> dict[str, float]:
    """Reload ``out`` the way the service does and check each LoRA arrived whole and changes the image.

    For every module written into a LoRA file, the loaded pipeline must hold a LoRA layer for that
    adapter whose A/B weights equal the file's down/up weights (kohya and peft layouts alike). Returns
    the mean absolute pixel change (0-255) each adapter at weight 1 causes; raises RuntimeError if a
    module is missing, a weight differs, or an adapter leaves the image unchanged.
    """
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from deskgen.loras import quiet_adapter_load

    pipe = StableDiffusionXLPipeline.from_pretrained(str(Path(out) / "sdxl"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = expected_weights(pipe)

    def render() -> Any:
        image = pipe(
            "a desk setup",
            num_inference_steps=steps,
            guidance_scale=5.0,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).images[0]
        return np.round(image * 255).astype(np.int16)

    base = render()
    changes: dict[str, float] = {}
    for name in LORAS:
        with quiet_adapter_load():
            pipe.load_lora_weights(str(Path(out) / "loras"), weight_name=f"{name}.safetensors", adapter_name=name)
        for component, modules in expected[name].items():
            model = getattr(pipe, component)
            for module_name, (down, up) in modules.items():
                try:
                    layer = model.get_submodule(module_name)
                    got_down = layer.lora_A[name].weight
                    got_up = layer.lora_B[name].weight
                except (AttributeError, KeyError) as exc:
                    raise RuntimeError(f"LoRA {name!r}: {component}.{module_name} was not loaded ({exc})") from exc
                if not (torch.equal(got_down, down) and torch.equal(got_up, up)):
                    raise RuntimeError(f"LoRA {name!r}: {component}.{module_name} loaded with different weights")
        pipe.set_adapters([name], adapter_weights=[1.0])
        changes[name] = float(np.abs(render() - base).mean())
        if changes[name] < MIN_VISIBLE_CHANGE:
            raise RuntimeError(f"LoRA {name!r} changes the {size}x{size} image by only {changes[name]:.3f} grey levels")
    pipe.disable_lora()
    if not np.array_equal(render(), base):
        raise RuntimeError("the image with LoRAs disabled differs from the base image")
    log.info("tiny LoRAs verified; mean pixel change per adapter: %s", json.dumps(changes))
    return changes


# --------------------------------------------------------------------------------------------------
# LoRA files the service must check (not written by build(): tests write them where they need them)
# --------------------------------------------------------------------------------------------------

#: Kinds of LoRA file :func:`write_lora_variant` writes, derived from the tiny kohya ``dalle``: two that
#: must load (``unet_only``: no ``lora_te`` keys, as most SDXL kohya trainings save; ``wider``: twice the
#: rank and more layers than any tiny adapter, so it fits no hot-swap slots laid out before it) and the
#: kinds diffusers cannot load correctly, each refused at replica start with a reason.
LORA_VARIANTS = ("unet_only", "wider", "loha", "dora", "truncated", "unknown_layout", "unpaired", "extra_layer")
#: The variants that load.
GOOD_LORA_VARIANTS = ("unet_only", "wider")


def like(rng: Any, shape: tuple[int, ...], tensor: Any) -> Any:
    """Seeded noise of ``shape`` with ``tensor``'s spread and dtype (numpy)."""
    return (rng.standard_normal(shape) * float(tensor.std())).astype(tensor.dtype)


def double_rank(down: Any, up: Any, rng: Any) -> tuple[Any, Any]:
    """A LoRA pair (down: rank x inputs, up: outputs x rank; numpy) at twice the rank: the first rows of down
    and columns of up are the pair's own, the rest seeded noise of the same spread."""
    import numpy as np

    return np.concatenate([down, like(rng, down.shape, down)]), np.concatenate([up, like(rng, up.shape, up)], axis=1)


def feed_forward_pair(attn1_to_q: str, rank: int, down: Any, up: Any, rng: Any) -> tuple[str, Any, Any]:
    """For the kohya UNet layer ``attn1_to_q`` of a transformer block and its pair (numpy): the kohya name of the
    same block's feed-forward output (``ff.net.2``: inner width 4 x dim -> dim, which no tiny adapter adapts)
    and a seeded pair for it at ``rank``, with the spread of ``down`` and ``up``."""
    dim = down.shape[1]
    return (attn1_to_q.removesuffix("attn1_to_q") + "ff_net_2", like(rng, (rank, 4 * dim), down),
            like(rng, (dim, rank), up))  # fmt: skip


def write_lora_variant(kind: str, loras: Path, path: Path) -> Path:
    """Write a LoRA file of ``kind`` (:data:`LORA_VARIANTS`) to ``path``, made from ``loras/dalle.safetensors``
    (numpy only: no torch)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    source = Path(loras) / "dalle.safetensors"
    tensors = load_file(str(source))
    bases = sorted(k.removesuffix(kohya.DOWN) for k in tensors if k.endswith(kohya.DOWN))
    out: dict[str, Any]
    if kind == "unet_only":
        out = {k: v for k, v in tensors.items() if k.startswith(kohya.UNET_PREFIX)}
    elif kind == "wider":
        # Rank 2r (the first r rows/columns are dalle's, the rest seeded noise of the same spread) on the
        # same layers, plus the feed-forward output (ff.net.2, inner width 4 x dim) of every transformer
        # block, which no tiny adapter adapts.
        rng = np.random.default_rng(8)
        out = {}
        for base in bases:
            down, up, alpha = tensors[base + kohya.DOWN], tensors[base + kohya.UP], tensors[base + kohya.ALPHA]
            out[base + kohya.DOWN], out[base + kohya.UP] = double_rank(down, up, rng)
            out[base + kohya.ALPHA] = alpha
            if base.startswith(kohya.UNET_PREFIX) and base.endswith("_attn1_to_q"):
                ff, ff_down, ff_up = feed_forward_pair(base, 2 * down.shape[0], down, up, rng)
                out |= {ff + kohya.DOWN: ff_down, ff + kohya.UP: ff_up, ff + kohya.ALPHA: alpha}
    elif kind == "loha":
        out = {}
        for base in bases:
            down, up = tensors[base + kohya.DOWN], tensors[base + kohya.UP]
            out |= {f"{base}.hada_w1_a": up, f"{base}.hada_w1_b": down, f"{base}.hada_w2_a": up.copy(),
                    f"{base}.hada_w2_b": down.copy(), base + kohya.ALPHA: tensors[base + kohya.ALPHA]}  # fmt: skip
    elif kind == "dora":
        # What kohya/LyCORIS write for DoRA: a magnitude vector per module next to the LoRA pair.
        out = dict(tensors) | {f"{b}.dora_scale": np.ones((1, tensors[b + kohya.UP].shape[0]), np.float32) for b in bases}
    elif kind == "truncated":
        data = source.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # an interrupted copy
        return path
    elif kind == "unknown_layout":
        out = {"model.diffusion_model.input_blocks.1.weight": np.zeros((4, 4), np.float32)}
    elif kind == "unpaired":
        out = {k: v for k, v in tensors.items() if k != bases[0] + kohya.UP}
    elif kind == "extra_layer":
        # A module the tiny UNet lacks (transformer block 7): diffusers would only warn and skip it.
        real = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        out = dict(tensors)
        for suffix in (kohya.DOWN, kohya.UP, kohya.ALPHA):
            out[real.replace("blocks_0_", "blocks_7_") + suffix] = tensors[real + suffix].copy()
    else:
        raise ValueError(f"unknown LoRA variant {kind!r}; the variants are {LORA_VARIANTS}")
    save_file(out, str(path))
    return path
