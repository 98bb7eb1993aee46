"""The desk gate (deskgen.classifier), its sample generator and its training CLI, on the tiny gate."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deskgen.classifier import (
    VGG16_NOTOP_FILE,
    DeskClassifier,
    build_gate_model,
    configure_tf_threads,
    preprocess_images,
)
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.images import decode_image
from deskgen.paths import PROJECT_ROOT
from deskgen.tools.gate_training.training import train_gate
from deskgen.tools.samples import NON_DESK_KINDS, desk_scene, generate_samples, non_desk_scene

pytestmark = pytest.mark.unit

VGG_MEANS_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


@pytest.fixture(scope="module")
def gate(tiny_models: Path) -> DeskClassifier:
    return DeskClassifier.load(tiny_models / "classifier" / "desk_gate.keras")


@pytest.fixture(scope="module")
def desk() -> Image.Image:
    return desk_scene(np.random.default_rng(4242), 96)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --- the tiny gate on held-out scenes ------------------------------------------------------------------


def test_tiny_gate_loads_with_its_input_size(gate: DeskClassifier) -> None:
    assert gate.input_size == 64
    assert gate.threshold == 0.5
    assert gate.model.output_shape == (None, 1)
    names = {layer.name for layer in gate.model.get_layer("tiny_vgg").layers}
    assert {"block1_conv1", "block1_pool", "block5_conv1", "block5_pool"} <= names


def test_held_out_desks_pass_and_non_desks_fail(gate: DeskClassifier) -> None:
    rng = np.random.default_rng(202)  # not a seed the training set was drawn from
    desks = [desk_scene(rng, 96) for _ in range(8)]
    others = [non_desk_scene(rng, 96, kind=kind) for kind in sorted(NON_DESK_KINDS) for _ in range(2)]
    desk_scores = gate.score_batch(desks)
    other_scores = gate.score_batch(others)
    assert all(gate.is_desk(s) for s in desk_scores), desk_scores
    assert not any(gate.is_desk(s) for s in other_scores), other_scores
    assert all(0.0 <= s <= 1.0 for s in desk_scores + other_scores)


def test_held_out_scenes_at_another_size(gate: DeskClassifier) -> None:
    # The gate squashes any size to 64 px: scenes drawn at 160 px still classify correctly.
    rng = np.random.default_rng(303)
    assert gate.is_desk(gate.score(desk_scene(rng, 160)))
    assert not gate.is_desk(gate.score(non_desk_scene(rng, 160, kind="landscape")))


def test_score_batch_equals_single_scores(gate: DeskClassifier) -> None:
    rng = np.random.default_rng(7)
    images = [desk_scene(rng, 96), non_desk_scene(rng, 96), desk_scene(rng, 80), non_desk_scene(rng, 120)]
    batch = gate.score_batch(images)
    singles = [gate.score(image) for image in images]
    assert len(batch) == 4
    np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-5)
    assert gate.score_batch([]) == []


def test_scoring_is_deterministic(gate: DeskClassifier, desk: Image.Image) -> None:
    assert gate.score(desk) == gate.score(desk.copy())


# --- odd inputs ----------------------------------------------------------------------------------------


def odd_variants(desk: Image.Image) -> dict[str, Image.Image]:
    grey = desk.convert("L")
    wide = Image.fromarray((np.asarray(grey, dtype=np.uint16) * 257).astype(np.uint16))
    assert wide.mode == "I;16"
    rgba = desk.convert("RGBA")
    palette = desk.quantize(colors=32)
    palette.info["transparency"] = 0
    la = grey.convert("LA")
    return {
        "RGBA": rgba,
        "LA": la,
        "P+transparency": palette,
        "CMYK": desk.convert("CMYK"),
        "L": grey,
        "I;16": wide,
        "1": desk.convert("1"),
        "1x1": Image.new("RGB", (1, 1), (120, 90, 60)),
        "4000x300": desk.resize((4000, 300)),
        "300x4000": desk.resize((300, 4000)),
    }


def test_odd_modes_and_sizes_all_score(gate: DeskClassifier, desk: Image.Image) -> None:
    variants = odd_variants(desk)
    scores = dict(zip(variants, gate.score_batch(list(variants.values())), strict=True))
    for name, score in scores.items():
        assert 0.0 <= score <= 1.0 and np.isfinite(score), (name, score)
    assert scores["RGBA"] == gate.score(desk)  # opaque alpha changes nothing
    assert scores["I;16"] == pytest.approx(scores["L"], abs=1e-6)  # 16-bit grey maps back onto 8-bit grey
    assert gate.is_desk(scores["CMYK"])


def test_odd_modes_decoded_from_files_score(gate: DeskClassifier, desk: Image.Image) -> None:
    variants = odd_variants(desk)
    fmt = {"CMYK": "TIFF", "P+transparency": "PNG"}
    for name, image in variants.items():
        if name == "P+transparency":
            data = encode(image, "PNG", transparency=0)
        else:
            data = encode(image, fmt.get(name, "PNG"))
        score = gate.score(decode_image(data))
        assert 0.0 <= score <= 1.0, (name, score)


def test_exif_rotated_jpeg_scores_like_the_upright_photo(gate: DeskClassifier, desk: Image.Image) -> None:
    upright = decode_image(encode(desk, "JPEG", quality=95))
    sideways = desk.transpose(Image.Transpose.ROTATE_90)  # stored as a camera held sideways writes it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    with_exif = decode_image(encode(sideways, "JPEG", quality=95, exif=exif.tobytes()))
    without_exif = decode_image(encode(sideways, "JPEG", quality=95))

    upright_x, rotated_x, raw_x = gate.preprocess([upright, with_exif, without_exif])
    assert np.abs(upright_x - rotated_x).mean() < 3.0  # same picture up to JPEG noise
    assert np.abs(upright_x - raw_x).mean() > 20.0  # the un-rotated pixels really differ
    upright_score, rotated_score = gate.score_batch([upright, with_exif])
    assert gate.is_desk(upright_score) and gate.is_desk(rotated_score)
    assert rotated_score == pytest.approx(upright_score, abs=0.05)


# --- preprocessing -------------------------------------------------------------------------------------


def test_preprocess_shape_dtype_and_vgg_normalisation(gate: DeskClassifier) -> None:
    images = [Image.new("RGB", (10, 30), (10, 20, 30)), Image.new("L", (200, 100), 40)]
    batch = gate.preprocess(images)
    assert batch.shape == (2, 64, 64, 3)
    assert batch.dtype == np.float32
    # RGB (10, 20, 30) -> BGR (30, 20, 10) minus the ImageNet means, everywhere (uniform image).
    expected = np.array([30, 20, 10], dtype=np.float32) - VGG_MEANS_BGR
    np.testing.assert_allclose(batch[0], np.broadcast_to(expected, (64, 64, 3)), atol=1e-4)
    np.testing.assert_allclose(batch[1, 0, 0], 40 - VGG_MEANS_BGR, atol=1e-4)


def test_preprocess_keeps_pixel_positions_at_input_size() -> None:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[7, 5] = (200, 100, 50)  # row 7, column 5
    batch = preprocess_images([Image.fromarray(arr)], 64)
    np.testing.assert_allclose(batch[0, 7, 5], np.array([50, 100, 200]) - VGG_MEANS_BGR, atol=1e-4)
    np.testing.assert_allclose(batch[0, 5, 7], -VGG_MEANS_BGR, atol=1e-4)


def test_preprocess_squashes_instead_of_cropping() -> None:
    # Left half red, right half blue, 4:1 wide: a center crop would lose most of both halves' edges;
    # the squash keeps the left column red and the right column blue.
    arr = np.zeros((50, 200, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:] = (0, 0, 255)
    batch = preprocess_images([Image.fromarray(arr)], 32) + VGG_MEANS_BGR
    np.testing.assert_allclose(batch[0, :, 0], np.broadcast_to([0, 0, 255], (32, 3)), atol=1e-3)
    np.testing.assert_allclose(batch[0, :, 31], np.broadcast_to([255, 0, 0], (32, 3)), atol=1e-3)


# --- threshold, errors, loading ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "high"])
def test_threshold_outside_unit_interval_raises(gate: DeskClassifier, bad: object) -> None:
    with pytest.raises(InvalidParameter) as info:
        DeskClassifier(gate.model, threshold=bad)  # type: ignore[arg-type]
    assert info.value.field == "threshold"
    assert info.value.message == f"`threshold` must be in [0, 1] but is {bad!r}."
    with pytest.raises(InvalidParameter, match="threshold"):
        gate.threshold = bad  # type: ignore[assignment]
    assert gate.threshold == 0.5


def test_threshold_bounds_and_decision(gate: DeskClassifier) -> None:
    strict = DeskClassifier(gate.model, threshold=1.0)
    lenient = DeskClassifier(gate.model, threshold=0.0)
    assert strict.is_desk(1.0) and not strict.is_desk(0.999)
    assert lenient.is_desk(0.0)
    assert gate.is_desk(0.5) and not gate.is_desk(0.4999)


def test_missing_model_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "desk_gate.keras"
    with pytest.raises(ModelFilesMissing) as info:
        DeskClassifier.load(missing)
    assert info.value.path == str(missing)
    assert str(missing) in str(info.value)


def test_load_rejects_bad_threshold_before_loading(tiny_models: Path) -> None:
    with pytest.raises(InvalidParameter, match=r"`threshold` must be in \[0, 1\] but is 2"):
        DeskClassifier.load(tiny_models / "classifier" / "desk_gate.keras", threshold=2)


def test_model_with_wrong_input_is_rejected() -> None:
    import keras

    inputs = keras.Input(shape=(None, None, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.raises(ValueError, match=r"must take a \(batch, s, s, 3\) input"):
        DeskClassifier(model)


def test_thread_settings_cannot_change_after_tensorflow_started(gate: DeskClassifier) -> None:
    import tensorflow as tf

    current = tf.config.threading.get_intra_op_parallelism_threads()
    configure_tf_threads(intra_op=current)  # the value in force: a no-op
    with pytest.raises(RuntimeError, match="already started"):
        configure_tf_threads(intra_op=current + 3)
    with pytest.raises(InvalidParameter, match="`intra_op` threads must be >= 0 but is -1"):
        configure_tf_threads(intra_op=-1)


# --- building models -----------------------------------------------------------------------------------


def test_vgg16_gate_freezes_all_but_block5_and_the_head() -> None:
    model = build_gate_model("vgg16", "none", input_size=32, train_last_block=True)
    assert model.input_shape == (None, 32, 32, 3)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3", "gate_dense", "desk_score"}
    frozen = build_gate_model("vgg16", "none", input_size=32)
    assert {w.path.split("/")[0] for w in frozen.trainable_weights} == {"gate_dense", "desk_score"}
    assert frozen.get_layer("vgg16").count_params() == 14_714_688  # VGG16 without its top


def test_imagenet_weights_must_be_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ModelFilesMissing) as info:
        build_gate_model("vgg16", "imagenet")
    assert info.value.path == str(tmp_path / "models" / VGG16_NOTOP_FILE)
    assert "never downloads" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"backbone": "resnet"}, "backbone"),
        ({"backbone": "tiny", "weights": "imagenet"}, "weights"),
        ({"backbone": "vgg16", "weights": "random"}, "weights"),
        ({"backbone": "tiny", "input_size": 16}, "input_size"),
    ],
)
def test_build_gate_model_rejects_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        build_gate_model(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# --- samples -------------------------------------------------------------------------------------------


def test_samples_are_deterministic_per_seed(tmp_path: Path) -> None:
    generate_samples(tmp_path / "a", 3, seed=5, size=48)
    generate_samples(tmp_path / "b", 3, seed=5, size=48)
    generate_samples(tmp_path / "c", 3, seed=6, size=48)
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png"))
    assert names == [f"false/other_{i:04d}.png" for i in range(3)] + [f"true/desk_{i:04d}.png" for i in range(3)]
    for name in names:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes()
        assert a != (tmp_path / "c" / name).read_bytes()
        with Image.open(tmp_path / "a" / name) as image:
            assert image.size == (48, 48) and image.mode == "RGB"


def test_scene_functions_validate_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidParameter, match="`kind` must be one of"):
        non_desk_scene(rng, 64, kind="beach")
    with pytest.raises(InvalidParameter, match="`size` must be at least 32 pixels but is 8"):
        desk_scene(rng, 8)
    with pytest.raises(InvalidParameter, match="`n_per_class` must be at least 1 but is 0"):
        generate_samples(Path("unused"), 0, seed=0)


# --- training ------------------------------------------------------------------------------------------


def test_train_gate_validates_before_training(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameter, match=r"`val_split` must be in \(0, 1\) but is 1.0"):
        train_gate(tmp_path, tmp_path / "g.keras", val_split=1.0)
    with pytest.raises(InvalidParameter, match=r"`out` must end in \.keras"):
        train_gate(tmp_path, tmp_path / "g.h5")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "true"))):
        train_gate(tmp_path, tmp_path / "g.keras", backbone="tiny")


def test_train_cli_writes_a_loadable_gate(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_samples(data, 20, seed=11, size=64)
    (data / "true" / "extra.jpg").write_bytes(encode(desk_scene(np.random.default_rng(1), 64), "JPEG"))
    out = tmp_path / "out" / "gate.keras"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "deskgen.train_classifier", str(data), "--out", str(out),
         "--backbone", "tiny", "--epochs", "3", "--batch-size", "8", "--seed", "3", "--input-size", "32"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    match = re.fullmatch(
        r"val_accuracy=(\d\.\d{4}) val_auc=\S+ precision=\S+ recall=\S+ threshold=\S+ n_train=(\d+) n_val=(\d+) "
        r"seconds=\d+\.\d out=(.+)",
        lines[0],
    )
    assert match, lines[0]
    assert 0.0 <= float(match.group(1)) <= 1.0
    assert (int(match.group(2)), int(match.group(3))) == (33, 8)  # 21 + 20 images, 4 + 4 held out
    assert match.group(4) == str(out)
    loaded = DeskClassifier.load(out)
    assert loaded.input_size == 32
    scores = loaded.score_batch([desk_scene(np.random.default_rng(2), 64), non_desk_scene(np.random.default_rng(2), 64)])
    assert all(0.0 <= s <= 1.0 for s in scores)
