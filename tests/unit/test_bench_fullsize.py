"""bench.fullsize: the full-size builders have the published parameter counts, and the kohya keys of
the full-size LoRAs map, through diffusers' own conversion, onto real modules of the full SDXL.

Everything is built on the meta device (no weights, no memory), so this stays a fast unit test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import fullsize
from bench.common import parse_choices
from deskgen import kohya
from deskgen.errors import InvalidParameter
from deskgen.paths import PROJECT_ROOT

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def meta_sdxl() -> dict[str, Any]:
    return fullsize.build_sdxl_components("meta")


def test_sdxl_parameter_counts_match_the_published_checkpoint(meta_sdxl: dict[str, Any]) -> None:
    counts = fullsize.check_param_counts(meta_sdxl)
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    unet = meta_sdxl["unet"]
    assert next(unet.parameters()).device.type == "meta"
    assert unet.config.cross_attention_dim == 2048
    assert unet.config.addition_embed_type == "text_time"
    assert meta_sdxl["text_encoder"].config.vocab_size == fullsize.CLIP_VOCAB_SIZE
    assert meta_sdxl["text_encoder_2"].config.projection_dim == 1280


def test_text_encoder_special_ids_are_the_tokenizers(meta_sdxl: dict[str, Any]) -> None:
    tokenizer = meta_sdxl["tokenizer"]
    ids = tokenizer("a desk setup")["input_ids"]
    for name in ("text_encoder", "text_encoder_2"):
        config = meta_sdxl[name].config
        assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert max(ids) < config.vocab_size
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77


def test_blip_base_parameter_count_and_vocabulary() -> None:
    from transformers import BlipForConditionalGeneration

    with fullsize.init_on("meta", None):
        model = BlipForConditionalGeneration(fullsize.blip_config())
    assert fullsize.count_params(model) == fullsize.EXPECTED_PARAMS["blip"] == 223_971_644
    vocab = fullsize.blip_vocabulary()
    text: Any = model.config.text_config
    vision: Any = model.config.vision_config
    assert len(vocab) == fullsize.BLIP_VOCAB_SIZE == text.vocab_size
    assert sorted(vocab.values()) == list(range(fullsize.BLIP_VOCAB_SIZE))
    assert (vocab["[PAD]"], vocab["[SEP]"], vocab["[DEC]"]) == (text.pad_token_id, text.sep_token_id, text.bos_token_id)
    assert vision.image_size == 384
    assert {p.device.type for p in model.parameters()} == {"meta"}  # counted without allocating 224 M floats


def test_kohya_unet_names_use_sgm_numbering() -> None:
    name = kohya.unet_name
    assert name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    )
    assert name("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0") == (
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    )
    assert name("mid_block.attentions.0.transformer_blocks.3.attn1.to_k") == (
        "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_k"
    )
    assert name("up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_v") == (
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v"
    )
    with pytest.raises(ValueError, match="no SGM name"):
        name("down_blocks.0.resnets.0.conv1")
    # transformers 5 spells the first encoder's modules without `text_model.`, the second with it;
    # files spell both with it.
    assert kohya.text_encoder_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert kohya.text_encoder_name("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj") == (
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    )


def test_kohya_keys_map_onto_real_modules_of_the_full_sdxl(meta_sdxl: dict[str, Any]) -> None:
    """Through diffusers' loader conversion (SGM -> diffusers -> peft), every LoRA module of the file
    lands on an existing Linear of the full-size model with matching shapes, and none is left over."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    targets = fullsize.lora_targets(meta_sdxl)
    # 70 transformer blocks (down 2x1 + 2x10, mid 10, up 3x10 + 3x2) x 2 attentions x 4 projections.
    assert {k: len(v) for k, v in targets.items()} == {"unet": 560, "text_encoder": 48, "text_encoder_2": 128}
    # Rank 1 keeps the tensors small; only names and shapes matter here.
    shapes = fullsize.kohya_key_shapes(targets, rank=1)
    state = {k: torch.zeros(shape) if shape else torch.tensor(1.0) for k, shape in shapes.items()}
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=meta_sdxl["unet"].config)
    assert len(alphas) == 736

    def strip(prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}

    per_component = {
        "unet": convert_unet_state_dict_to_peft(strip("unet.")),
        "text_encoder": convert_state_dict_to_peft(convert_state_dict_to_diffusers(strip("text_encoder."))),
        "text_encoder_2": convert_state_dict_to_peft(convert_state_dict_to_diffusers(strip("text_encoder_2."))),
    }
    for component, peft_state in per_component.items():
        model = meta_sdxl[component]
        found = {}
        for key, tensor in peft_state.items():
            module_name, kind = key.rsplit(".lora_", 1)
            if not hasattr(model, "text_model"):
                # transformers 5's CLIPTextModel has no `text_model.` level; its loader strips it.
                module_name = module_name.removeprefix("text_model.")
            module = model.get_submodule(module_name)
            assert isinstance(module, torch.nn.Linear), key
            expected = (1, module.in_features) if kind == "A.weight" else (module.out_features, 1)
            assert tuple(tensor.shape) == expected, key
            found[module_name] = True
        assert sorted(found) == sorted(targets[component]), component


def test_random_lora_is_seeded_and_bounded() -> None:
    targets = {"unet": {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (64, 32)}, "text_encoder": {"encoder.layers.0.self_attn.q_proj": (16, 16)}}
    first = fullsize.random_kohya_lora(targets, 5, rank=4, dtype="float32")
    second = fullsize.random_kohya_lora(targets, 5, rank=4, dtype="float32")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    down = first["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    assert tuple(down.shape) == (4, 16) and float(down.abs().max()) < 3.0


def test_parts_and_out_dir_are_validated(tmp_path: Path) -> None:
    assert parse_choices(None, fullsize.PARTS, option="--only") == ("sdxl", "loras", "blip", "vgg")
    assert parse_choices("vgg, blip", fullsize.PARTS, option="--only") == ("vgg", "blip")
    with pytest.raises(InvalidParameter, match="`--only` must name some of"):
        parse_choices("sdxl,unet", fullsize.PARTS, option="--only")
    with pytest.raises(InvalidParameter, match="must be outside the repository"):
        fullsize.check_out_dir(PROJECT_ROOT / "models" / "full")
    assert fullsize.check_out_dir(tmp_path) == tmp_path.resolve()
