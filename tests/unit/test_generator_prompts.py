"""Prompts longer than CLIP's 77 tokens (issue 14, point 2), on the tiny SDXL: the short path is the
pipeline's own bit for bit, a long prompt's tail reaches the image, token counts are the tokenizer's,
an empty negative prompt is SDXL's zeros, and embeddings carry the active LoRA mix."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgen.generator import DEFAULT_NEGATIVE_PROMPT, DeskGenerator, GenerationParams
from deskgen.generator.prompts import PromptEncoder
from deskgen.mixes import Mix
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for

pytestmark = pytest.mark.unit

#: 20 tokens a phrase, +1 for each comma: 8 of them are 167 tokens (169 with start and end), 3 chunks.
PHRASE = "a cozy gaming setup with rgb lights two monitors a mechanical keyboard and headphones"
LONG = ", ".join([PHRASE] * 8)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def gen(tiny_models: Path) -> DeskGenerator:
    return DeskGenerator.from_pretrained(settings_for(tiny_models))


def params(**changes: Any) -> GenerationParams:
    return dataclasses.replace(PARAMS, **changes)


def plain_pipeline(gen: DeskGenerator, p: GenerationParams, **prompts: Any) -> bytes:
    """The image of a plain pipeline call, as deskgen made it before long prompts (strings in)."""
    import torch

    with gen.lock:
        return gen.pipe(  # type: ignore[no-any-return]
            **prompts, num_inference_steps=p.steps, guidance_scale=p.guidance, width=p.width, height=p.height,
            generator=torch.Generator("cpu").manual_seed(p.seed), output_type="pil",
        ).images[0].tobytes()  # fmt: skip


def tokens(gen: DeskGenerator, text: str) -> int:
    return len(gen.pipe.tokenizer(text, verbose=False).input_ids)


# -- the short path is today's --------------------------------------------------------------------


@pytest.mark.parametrize("mix", [Mix(()), Mix.from_weights({"dalle": 0.7, "ott": 0.5})], ids=["base", "mix"])
def test_short_prompts_are_the_plain_pipeline_call_bit_for_bit(gen: DeskGenerator, mix: Mix) -> None:
    assert tokens(gen, PARAMS.prompt) <= 77 and tokens(gen, DEFAULT_NEGATIVE_PROMPT) <= 77
    result = gen.generate(PARAMS, mix)
    assert result.metadata["prompt_chunks"] == 1
    # The pipeline now holds the mix: a plain call with the same strings and seed draws the same bytes.
    expected = plain_pipeline(gen, PARAMS, prompt=PARAMS.prompt, negative_prompt=PARAMS.negative_prompt)
    assert result.image.tobytes() == expected


def test_a_one_chunk_encoding_equals_the_pipelines(gen: DeskGenerator) -> None:
    # The chunk layout (start, tokens, end, padding) is exactly what the pipeline builds for <= 77 tokens.
    import torch

    kwargs, chunks = gen.prompts.embed(PARAMS.prompt, DEFAULT_NEGATIVE_PROMPT, device="cpu")
    ref = gen.pipe.encode_prompt(PARAMS.prompt, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=DEFAULT_NEGATIVE_PROMPT)  # fmt: skip
    assert chunks == 1
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    assert all(torch.equal(kwargs[name], value) for name, value in zip(names, ref, strict=True))


# -- long prompts -----------------------------------------------------------------------------------


def test_token_counts_are_the_tokenizers(gen: DeskGenerator) -> None:
    negative = ", ".join([DEFAULT_NEGATIVE_PROMPT] * 4)
    meta = gen.generate(params(prompt=LONG, negative_prompt=negative), Mix(())).metadata
    assert meta["prompt_tokens"] == tokens(gen, LONG) == 169
    assert meta["negative_prompt_tokens"] == tokens(gen, negative) > 77
    assert meta["prompt_chunks"] == 3
    short = gen.generate(PARAMS, Mix(())).metadata
    assert (short["prompt_tokens"], short["negative_prompt_tokens"]) == (
        tokens(gen, PARAMS.prompt), tokens(gen, DEFAULT_NEGATIVE_PROMPT))
    assert gen.generate(params(negative_prompt=""), Mix(())).metadata["negative_prompt_tokens"] == 0


def test_the_tail_of_a_long_prompt_changes_the_image(gen: DeskGenerator) -> None:
    # Everything after token 77 was cut before: these two prompts drew the same image.
    red = gen.generate(params(prompt=LONG + ", red wooden desk"), Mix(()))
    blue = gen.generate(params(prompt=LONG + ", blue glass desk"), Mix(()))
    assert red.metadata["prompt_tokens"] > 77
    assert red.image.tobytes() != blue.image.tobytes()
    # Deterministic, like every generation.
    assert gen.generate(params(prompt=LONG + ", red wooden desk"), Mix(())).image.tobytes() == red.image.tobytes()


def test_the_tail_of_a_long_negative_prompt_changes_the_image(gen: DeskGenerator) -> None:
    negative = ", ".join([DEFAULT_NEGATIVE_PROMPT] * 4)
    one = gen.generate(params(negative_prompt=negative + ", cartoon"), Mix(()))
    other = gen.generate(params(negative_prompt=negative + ", sketch painting"), Mix(()))
    assert one.metadata["prompt_chunks"] > 1
    assert one.image.tobytes() != other.image.tobytes()


def test_chunks_split_at_a_comma_near_the_limit(gen: DeskGenerator) -> None:
    encoder = PromptEncoder(gen.pipe)
    chunks = encoder._chunks(gen.pipe.tokenizer, LONG)
    assert [len(c) for c in chunks] == [63, 63, 41]  # three phrases + commas per chunk, never more than 75
    comma = gen.pipe.tokenizer.convert_tokens_to_ids(",</w>")
    assert [c[-1] for c in chunks[:-1]] == [comma, comma]
    assert [t for c in chunks for t in c] == gen.pipe.tokenizer(LONG, add_special_tokens=False, verbose=False).input_ids


def test_77_tokens_take_the_pipeline_path_and_78_the_chunked_one(gen: DeskGenerator) -> None:
    encoder = PromptEncoder(gen.pipe)
    words = ["desk"] * 75
    assert encoder.count(" ".join(words)) == 77 and encoder.fits(" ".join(words))
    assert encoder.count(" ".join([*words, "lamp"])) == 78 and not encoder.fits(" ".join([*words, "lamp"]))
    at_limit = encoder.prepare(" ".join(words), "", device="cpu")
    assert at_limit.pipe_kwargs == {"prompt": " ".join(words), "negative_prompt": None}
    over = encoder.prepare(" ".join([*words, "lamp"]), "", device="cpu")
    assert over.chunks == 2 and over.pipe_kwargs["prompt_embeds"].shape[1] == 2 * 77


# -- the empty negative prompt ---------------------------------------------------------------------


def test_an_empty_negative_prompt_means_sdxls_zeros(gen: DeskGenerator) -> None:
    import torch

    assert gen.pipe.config.force_zeros_for_empty_prompt
    empty = gen.generate(params(negative_prompt=""), Mix(())).image.tobytes()
    assert empty == plain_pipeline(gen, PARAMS, prompt=PARAMS.prompt, negative_prompt=None)
    assert empty != plain_pipeline(gen, PARAMS, prompt=PARAMS.prompt, negative_prompt="")  # not the encoding of ""
    # Long prompts too: zeros of the prompt's shape.
    long = gen.prompts.prepare(LONG, "", device="cpu").pipe_kwargs
    assert long["negative_prompt_embeds"].shape == long["prompt_embeds"].shape
    assert not long["negative_prompt_embeds"].any() and not long["negative_pooled_prompt_embeds"].any()
    assert long["prompt_embeds"].dtype == torch.float32


# -- embeddings carry the active mix (peft adapters, a fused hot mix, hot-swap) ---------------------


@pytest.mark.parametrize("flags", [{}, {"fuse_hot_mix": "dalle_ott"}, {"hotswap": True}], ids=["peft", "fused", "hotswap"])
def test_long_prompt_embeddings_use_the_active_mixs_text_encoders(tiny_models: Path, flags: dict[str, Any]) -> None:
    import torch

    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, **flags))
    mix = Mix.from_weights({"dalle": 0.7, "ott": 0.5})
    fresh.activate_mix(Mix(()))
    base, _ = fresh.prompts.embed(LONG, "", device="cpu")
    fresh.activate_mix(mix)
    with_mix, _ = fresh.prompts.embed(LONG, "", device="cpu")
    assert not torch.equal(base["prompt_embeds"], with_mix["prompt_embeds"])  # the text-encoder LoRAs act
    # One chunk of the chunked path equals the pipeline's own encoding under the same mix.
    short, _ = fresh.prompts.embed(PARAMS.prompt, "", device="cpu")
    ref = fresh.pipe.encode_prompt(PARAMS.prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(short["prompt_embeds"], ref[0]) and torch.equal(short["pooled_prompt_embeds"], ref[2])
    if "fuse_hot_mix" in flags:
        assert fresh.fused_mix_id == mix.id  # the embeddings above came from fused text-encoder weights
    one = fresh.generate(params(prompt=LONG), mix).image.tobytes()
    assert one != fresh.generate(params(prompt=LONG), Mix(())).image.tobytes()
    assert fresh.generate(params(prompt=LONG), mix).image.tobytes() == one
