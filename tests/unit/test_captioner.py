from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deskgen.captioner import Captioner, CaptionSet, DecodeSettings
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.images import to_rgb
from deskgen.limits import MAX_PREFIXES
from deskgen.paths import PROJECT_ROOT
from deskgen.prompts.captions import DEFAULT_PREFIXES, rank_keywords

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def blip_dir(tiny_models: Path) -> Path:
    return tiny_models / "blip"


@pytest.fixture(scope="module")
def captioner(blip_dir: Path) -> Captioner:
    return Captioner.from_pretrained(str(blip_dir))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    gradient = Image.fromarray(np.linspace(0, 255, 80 * 80 * 3).reshape(80, 80, 3).astype(np.uint8))
    return [
        noise,
        gradient,
        Image.new("RGB", (120, 90), (200, 180, 150)),
        Image.new("RGB", (64, 64), (20, 20, 20)),
    ]


def _vocab(captioner: Captioner) -> set[str]:
    return set(captioner._tokenizer.get_vocab())


def test_caption_has_unconditional_and_one_per_prefix_in_order(
    captioner: Captioner, images: list[Image.Image]
) -> None:
    result = captioner.caption(images[0])
    assert isinstance(result, CaptionSet)
    assert [prefix for prefix, _ in result.conditional] == list(DEFAULT_PREFIXES)
    assert len(result.texts()) == 1 + len(DEFAULT_PREFIXES)
    vocab = _vocab(captioner)
    for text in result.texts():
        assert text, "empty caption"
        # Real words of the tiny vocabulary, no [UNK]/[DEC]/[SEP] and no word pieces.
        assert all(word in vocab and not word.startswith(("[", "##")) for word in text.split()), text
    # The tiny decoder is steered towards desk objects: the keyword ranking has something to rank.
    assert len(rank_keywords(result.texts())) >= 3


def test_conditional_captions_do_not_echo_their_prefix(
    captioner: Captioner, images: list[Image.Image]
) -> None:
    tokenizer = captioner._tokenizer
    for result in captioner.caption_batch(images):
        for prefix, caption in result.conditional:
            # The decoder echoes the prefix as the tokenizer normalises it ("q : what objects ...").
            echoed = tokenizer.decode(tokenizer(prefix, add_special_tokens=False)["input_ids"])
            assert not caption.lower().startswith(prefix.lower())
            assert not caption.startswith(echoed), (prefix, caption)


def test_captions_equal_blip_generate_with_the_prefix_cut(
    blip_dir: Path, captioner: Captioner, images: list[Image.Image]
) -> None:
    """The captioner reuses one vision pass for all prompts; the result must equal transformers' own
    ``BlipForConditionalGeneration.generate`` recipe, prompt by prompt."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    processor = BlipProcessor.from_pretrained(blip_dir)
    greedy = captioner.decoding.generate_kwargs()
    assert greedy["no_repeat_ngram_size"] == 3 and greedy["num_beams"] == 1 and not greedy["do_sample"]
    ours = captioner.caption_batch(images)
    with torch.inference_mode():
        inputs = processor(images=images, return_tensors="pt")
        out = model.generate(pixel_values=inputs["pixel_values"], **greedy)
        expected_unconditional = [processor.decode(row, skip_special_tokens=True) for row in out]
        assert [r.unconditional for r in ours] == expected_unconditional
        for index, prefix in enumerate(DEFAULT_PREFIXES):
            inputs = processor(images=images, text=[prefix] * len(images), return_tensors="pt")
            out = model.generate(**inputs, **greedy)
            cut = inputs["input_ids"].shape[1] - 1  # generate swaps [CLS] for [DEC] and drops [SEP]
            expected = [processor.decode(row[cut:], skip_special_tokens=True) for row in out]
            assert [r.conditional[index][1] for r in ours] == expected


def test_captions_are_deterministic(blip_dir: Path, captioner: Captioner, images: list[Image.Image]) -> None:
    first = captioner.caption(images[0])
    assert captioner.caption(images[0]) == first
    assert Captioner.from_pretrained(str(blip_dir)).caption(images[0].copy()) == first


def test_caption_batch_equals_per_image_captions(captioner: Captioner, images: list[Image.Image]) -> None:
    batch = captioner.caption_batch(images)
    assert batch == [captioner.caption(image) for image in images]
    # The images give different captions, so the comparison above can catch a mix-up between images.
    assert len({result.texts()[0] for result in batch} | {r.texts()[1] for r in batch}) > 1
    assert captioner.caption_batch([]) == []


def test_set_prefixes_changes_the_conditional_captions(blip_dir: Path, images: list[Image.Image]) -> None:
    captioner = Captioner.from_pretrained(str(blip_dir))
    before = captioner.caption(images[0])
    captioner.set_prefixes(["a picture of", "desk:"])
    assert captioner.prefixes == ("a picture of", "desk:")
    after = captioner.caption(images[0])
    assert [prefix for prefix, _ in after.conditional] == ["a picture of", "desk:"]
    assert after.unconditional == before.unconditional
    assert all(caption for _, caption in after.conditional)

    captioner.set_prefixes([])
    only = captioner.caption(images[0])
    assert only.conditional == ()
    assert only.texts() == [before.unconditional]


def test_custom_prefixes_at_construction(blip_dir: Path, images: list[Image.Image]) -> None:
    captioner = Captioner.from_pretrained(str(blip_dir), prefixes=("desk_setup:",), max_new_tokens=5)
    result = captioner.caption(images[1])
    assert [prefix for prefix, _ in result.conditional] == ["desk_setup:"]
    # Every word of the tiny vocabulary is one token: at most 5 new tokens -> at most 5 words.
    assert all(1 <= len(text.split()) <= 5 for text in result.texts())


@pytest.mark.parametrize(
    ("prefixes", "rule"),
    [
        ([""], "`prefixes[0]` must be non-blank"),
        (["ok", "   "], "`prefixes[1]` must be non-blank"),
        (["x" * 201], "at most 200 characters but is 201"),
        (
            [f"p{i}" for i in range(MAX_PREFIXES + 1)],
            f"at most {MAX_PREFIXES} prefixes but holds {MAX_PREFIXES + 1}",
        ),
        (["a photo\nof"], "control characters"),
        (["same", "same"], "must be distinct"),
        ("This is a photo of", "must be a list of strings but is str"),
        ([3], "`prefixes[0]` must be a string but is int"),
    ],
)
def test_bad_prefixes_are_rejected(captioner: Captioner, prefixes: object, rule: str) -> None:
    before = captioner.prefixes
    with pytest.raises(InvalidParameter) as info:
        captioner.set_prefixes(prefixes)  # type: ignore[arg-type]
    assert info.value.field == "prefixes"
    assert rule in info.value.message
    assert captioner.prefixes == before  # a rejected update leaves the old prefixes in place


def test_bad_prefixes_at_construction(blip_dir: Path) -> None:
    with pytest.raises(InvalidParameter, match="non-blank"):
        Captioner.from_pretrained(str(blip_dir), prefixes=["  "])


@pytest.mark.parametrize(
    ("max_new_tokens", "rule"), [(0, "integer >= 1"), (500, "over the decoder's 128 positions")]
)
def test_bad_max_new_tokens(blip_dir: Path, max_new_tokens: int, rule: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        Captioner.from_pretrained(str(blip_dir), max_new_tokens=max_new_tokens)
    assert info.value.field == "max_new_tokens"
    assert rule in info.value.message


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-blip"
    with pytest.raises(ModelFilesMissing) as info:
        Captioner.from_pretrained(str(missing))
    assert info.value.path == str(missing)
    assert str(missing) in str(info.value)


def test_missing_relative_folder_is_resolved_against_the_project_root() -> None:
    with pytest.raises(ModelFilesMissing) as info:
        Captioner.from_pretrained("models/no-such-blip")
    assert info.value.path == str(PROJECT_ROOT / "models" / "no-such-blip")


def test_folder_without_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing) as info:
        Captioner.from_pretrained(str(tmp_path))
    assert info.value.path == str(tmp_path)


def test_bad_dtype_and_device(blip_dir: Path) -> None:
    with pytest.raises(InvalidParameter) as info:
        Captioner.from_pretrained(str(blip_dir), dtype="int8")
    assert info.value.field == "dtype"
    assert "float32, float16, bfloat16 but is 'int8'" in info.value.message
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameter) as info:
            Captioner.from_pretrained(str(blip_dir), device="cuda")
        assert info.value.field == "device"


def test_bfloat16_on_cpu(blip_dir: Path, images: list[Image.Image]) -> None:
    captioner = Captioner.from_pretrained(str(blip_dir), device="cpu", dtype="bfloat16")
    result = captioner.caption(images[0])
    assert len(result.texts()) == 1 + len(DEFAULT_PREFIXES)
    assert all(result.texts())


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "F"])
def test_any_image_mode_goes_through_to_rgb(
    captioner: Captioner, images: list[Image.Image], mode: str
) -> None:
    image = images[1].convert(mode) if mode not in ("I;16", "F") else images[1].convert("L").convert(mode)
    result = captioner.caption(image)
    assert result == captioner.caption(to_rgb(image))
    assert all(result.texts())


def test_non_image_is_a_type_error(captioner: Captioner) -> None:
    with pytest.raises(TypeError, match=r"images\[0\] must be a PIL image but is bytes"):
        captioner.caption_batch([b"\x89PNG"])  # type: ignore[list-item]


def test_caption_set_views() -> None:
    result = CaptionSet("a desk", (("This is a photo of", "a monitor"), ("desk_setup:", "lamp")))
    assert result.texts() == ["a desk", "a monitor", "lamp"]
    assert result.as_dict() == {
        "unconditional": "a desk",
        "conditional": [
            {"prefix": "This is a photo of", "caption": "a monitor"},
            {"prefix": "desk_setup:", "caption": "lamp"},
        ],
    }
    json.dumps(result.as_dict())


def test_hub_folder_layout_loads(
    blip_dir: Path, captioner: Captioner, images: list[Image.Image], tmp_path: Path
) -> None:
    """The Salesforce checkpoint predates transformers 5: preprocessor_config.json with an int size,
    vocab.txt + special_tokens_map.json, no processor_config.json or tokenizer.json."""
    hub = tmp_path / "blip-image-captioning-base"
    hub.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(blip_dir / name, hub / name)
    vocab = captioner._tokenizer.get_vocab()
    (hub / "vocab.txt").write_text("".join(f"{word}\n" for word in sorted(vocab, key=vocab.__getitem__)))
    image_size = json.loads((blip_dir / "config.json").read_text())["vision_config"]["image_size"]
    (hub / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_normalize": True,
                "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "BlipImageProcessor",
                "processor_class": "BlipProcessor",
                "size": image_size,
            }
        )
    )
    (hub / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "do_lower_case": True,
                "model_max_length": 512,
                "processor_class": "BlipProcessor",
                "tokenizer_class": "BertTokenizer",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "mask_token": "[MASK]",
                "unk_token": "[UNK]",
            }
        )
    )
    (hub / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "[DEC]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
                "pad_token": "[PAD]",
                "sep_token": "[SEP]",
                "unk_token": "[UNK]",
            }
        )
    )
    loaded = Captioner.from_pretrained(str(hub))
    assert loaded.caption_batch(images) == captioner.caption_batch(images)


# -- decoding guarded against loops ------------------------------------------------------------------


def _repeated_trigrams(text: str) -> int:
    words = text.split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) - len(set(trigrams))


def test_plain_greedy_loops_and_the_default_guard_stops_it(blip_dir: Path, images: list[Image.Image]) -> None:
    """The tiny decoder never emits [SEP], so plain greedy runs into loops like real greedy BLIP does; the
    default settings (no 3-gram twice) give captions without a repeated 3-gram, image by image."""
    plain = Captioner.from_pretrained(str(blip_dir), no_repeat_ngram_size=0)
    guarded = Captioner.from_pretrained(str(blip_dir))
    assert guarded.decoding == DecodeSettings(30, 3, 1.0)
    plain_texts = [t for r in plain.caption_batch(images) for t in r.texts()]
    guarded_texts = [t for r in guarded.caption_batch(images) for t in r.texts()]
    assert sum(_repeated_trigrams(t) for t in plain_texts) > 0
    assert [_repeated_trigrams(t) for t in guarded_texts] == [0] * len(guarded_texts)
    assert all(len(t.split()) <= 30 for t in guarded_texts)


def test_set_decoding_applies_without_reloading(blip_dir: Path, images: list[Image.Image]) -> None:
    captioner = Captioner.from_pretrained(str(blip_dir))
    before = captioner.caption(images[0])
    captioner.set_decoding(DecodeSettings(max_new_tokens=4, no_repeat_ngram_size=0, repetition_penalty=1.3))
    short = captioner.caption(images[0])
    assert all(1 <= len(t.split()) <= 4 for t in short.texts())
    assert short != before
    captioner.set_decoding(DecodeSettings())
    assert captioner.caption(images[0]) == before
    with pytest.raises(InvalidParameter, match="over the decoder's 128 positions") as info:
        captioner.set_decoding(DecodeSettings(max_new_tokens=120))
    assert info.value.field == "max_new_tokens"
    assert captioner.decoding == DecodeSettings()  # unchanged after the refusal


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"no_repeat_ngram_size": 1}, "no_repeat_ngram_size", "0 (off) or an integer in 2..10"),
        ({"no_repeat_ngram_size": 11}, "no_repeat_ngram_size", "0 (off) or an integer in 2..10"),
        ({"repetition_penalty": 0.9}, "repetition_penalty", "in [1.0, 2.0]"),
        ({"repetition_penalty": "1.2"}, "repetition_penalty", "in [1.0, 2.0]"),
        ({"max_new_tokens": 0}, "max_new_tokens", "integer >= 1"),
    ],
)
def test_bad_decode_settings_name_the_field(kwargs: dict[str, object], field: str, rule: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        DecodeSettings(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field and rule in info.value.message


# -- the deployment's user_config: vocabulary and decoding ----------------------------------------------


class _FixedCaptions:
    """A stand-in for the BLIP captioner: the issue's Test 3 captions (as deskgen's captioner cuts them)
    for every image, and the settings it was configured with."""

    def __init__(self, captions: CaptionSet) -> None:
        self.captions = captions
        self.configured: tuple[object, ...] = ()

    def caption_batch(self, images: list[Image.Image]) -> list[CaptionSet]:
        return [self.captions for _ in images]

    def configure(self, prefixes: list[str], settings: DecodeSettings) -> None:
        self.configured = (tuple(prefixes), settings)


TEST_3 = CaptionSet(
    unconditional="a desk with a globe and a laptop",
    conditional=(
        ("This is a photo of", "a desk full of computers"),
        ("Q: What objects are on the desk? A:", "laptop, a keyboard, and a monitor"),
        ("desk_setup:", "_ with a laptop, monitor, keyboard, mouse, and mouse"),
    ),
)


def test_the_deployment_builds_clean_prompts_and_extends_its_vocabulary_from_user_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio
    import logging

    from deployments.captioner import Captioner as CaptionerDeployment
    from deployments.captioner import log as deployment_log

    deployment_log.addHandler(caplog.handler)  # Ray's "ray.serve" logger does not propagate

    stand_in = _FixedCaptions(TEST_3)
    deployment = CaptionerDeployment.func_or_class("unused", captioner=stand_in)  # type: ignore[arg-type]
    image = Image.new("RGB", (8, 8))

    async def scenario() -> tuple[object, object]:
        deployment.reconfigure({})
        plain = await deployment.caption(image)
        deployment.reconfigure(
            {"vocabulary": {"extra_objects": {"globe": ["world globe"]}}, "no_repeat_ngram_size": 4, "max_new_tokens": 20}
        )
        return plain, await deployment.caption(image)

    try:
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            plain, extended = asyncio.run(scenario())
    finally:
        deployment_log.removeHandler(caplog.handler)
    assert plain.prompt == (  # type: ignore[attr-defined]
        "a desk setup with laptop, keyboard, monitor, computer, mouse, high quality, detailed, professional photo"
    )
    assert "globe x1" in caplog.text  # reported, not guessed into the prompt
    assert extended.prompt.startswith("a desk setup with laptop, keyboard, monitor, globe, computer, mouse, ")  # type: ignore[attr-defined]
    assert stand_in.configured == (DEFAULT_PREFIXES, DecodeSettings(20, 4, 1.0))


@pytest.mark.parametrize(
    ("user_config", "where", "message"),
    [
        ({"vocabulary": {"extra_objects": {"Globe": []}}}, "vocabulary", "`vocabulary.extra_objects['Globe']`"),
        ({"vocabulary": {"extra_objects": {"a": ["b"], "c": ["b"]}}}, "vocabulary", "'b' is listed for both"),
        ({"vocabulary": {"objects": {}}}, "vocabulary.objects", "Extra inputs are not permitted"),
        ({"no_repeat_ngram_size": 1}, "", "`no_repeat_ngram_size` must be 0 (off) or an integer in 2..10"),
        ({"repetition_penalty": 3}, "repetition_penalty", "less than or equal to 2"),
    ],
)
def test_bad_captioner_user_config_names_the_field(user_config: dict[str, object], where: str, message: str) -> None:
    from pydantic import ValidationError

    from deployments.captioner import CaptionerConfig

    with pytest.raises(ValidationError) as info:
        CaptionerConfig.model_validate(user_config)
    error = info.value.errors()[0]
    assert ".".join(str(part) for part in error["loc"]) == where
    assert message in error["msg"]
