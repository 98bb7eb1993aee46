from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deskgen.captioner import Captioner, CaptionSet
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.images import to_rgb
from deskgen.limits import MAX_PREFIXES
from deskgen.paths import PROJECT_ROOT
from deskgen.prompt import DEFAULT_PREFIXES, rank_keywords

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
    greedy = {"max_new_tokens": captioner.max_new_tokens, "num_beams": 1, "do_sample": False}
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
