"""Tests for diffusion_jax.data with named TFDS datasets (mnist, cifar10, celeb_a): a
prepared dataset found by name, the message for a missing one, and tfds.testing.mock_data
records through the whole pipeline, checked against an independent implementation of PIL's
2x bilinear reduction and of the centre crop. The bundled digits dataset is tested in
test_data.py.

Everything runs offline in tmp dirs, with the socket functions patched to refuse.
"""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data, data_transforms

from helpers import DIGITS_NUM_TEST as NUM_TEST, digits_data_cfg as make_cfg, take


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data pipeline tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_prepared_named_dataset_reads_through_the_same_path(digits_dir, no_network):
    """A real (unmocked) array_record dataset found by TFDS name: here the built digits."""
    by_name = make_cfg(digits_dir, name="sklearn_digits", split="test")
    spec = data.dataset_spec(by_name)
    assert spec == data.DatasetSpec(
        name="sklearn_digits", image_shape=(8, 8, 1), num_classes=10, num_examples=NUM_TEST
    )
    for a, b in zip(
        data.load_split_arrays(by_name, "test"),
        data.load_split_arrays(make_cfg(digits_dir), "test"),
    ):
        np.testing.assert_array_equal(a, b)
    # Named datasets may also shrink (digits may not): antialiased 8 -> 4.
    small, _ = data.load_split_arrays(
        make_cfg(digits_dir, name="sklearn_digits", image_size=4), "test"
    )
    assert small.shape == (NUM_TEST, 4, 4, 1) and -1.0 <= small.min() <= small.max() <= 1.0


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_named_dataset_says_how_to_prepare_it(tmp_path, no_network, name):
    cfg = make_cfg(tmp_path, name=name, image_size=32)
    with pytest.raises(FileNotFoundError) as info:
        data.dataset_spec(cfg)
    message = str(info.value)
    assert f"tfds build {name}" in message
    assert "--file_format=array_record" in message
    assert "--config.data.data_dir" in message
    with pytest.raises(FileNotFoundError):
        data.create_train_iterator(cfg, batch_size=8, seed=0)
    assert not list(tmp_path.iterdir())  # nothing downloaded or written


def test_unknown_dataset_name(tmp_path, no_network):
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'"):
        data.dataset_spec(make_cfg(tmp_path, name="no_such_dataset_xyz"))


def downsample2_bilinear(x, axis):
    """PIL's antialiased bilinear reduction by exactly 2 along ``axis``, rounded to
    integers: the triangle filter of half-width 2 input pixels around output pixel i (input
    coordinate 2i + 1) weighs inputs 2i-1, 2i, 2i+1, 2i+2 by 1, 3, 3, 1 (/ 8); at the
    borders the tap outside the image is dropped and the rest renormalized (3, 3, 1 / 7)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
    n = x.shape[0]
    assert n % 2 == 0
    padded = np.concatenate([np.zeros_like(x[:1]), x, np.zeros_like(x[:1])])
    inside = np.concatenate([[0.0], np.ones(n), [0.0]]).reshape((-1,) + (1,) * (x.ndim - 1))
    first = 2 * np.arange(n // 2)  # output i reads padded rows 2i .. 2i+3 = inputs 2i-1 .. 2i+2
    total = sum(w * padded[first + j] for j, w in enumerate((1, 3, 3, 1)))
    norm = sum(w * inside[first + j] for j, w in enumerate((1, 3, 3, 1)))
    return np.moveaxis(np.floor(total / norm + 0.5), 0, axis)


def shrink2(images):
    """[..., H, W, C] uint8 -> [..., H/2, W/2, C] as PIL's bilinear resize: width first,
    the intermediate rounded to integers, then height."""
    return downsample2_bilinear(downsample2_bilinear(images, axis=-2), axis=-3)


def assert_pixels(got, want_uint8):
    """``got`` (float32 in [-1, 1]) is ``want_uint8 / 127.5 - 1`` up to one uint8 step.

    The scaling is checked exactly: (got + 1) * 127.5 must be an integer (float32 round-off
    of x / 127.5 - 1 is ~6e-8, i.e. ~1e-5 on the 0..255 scale; 1e-3 allowed). The integer
    may differ from the independent resize by 1 where PIL's fixed-point arithmetic or pass
    order rounds the other way (measured: never, for these 2x reductions)."""
    u = (np.asarray(got, np.float64) + 1.0) * 127.5
    assert np.all(np.abs(u - np.rint(u)) < 1e-3), "not k / 127.5 - 1 for an integer k"
    np.testing.assert_array_less(np.abs(np.rint(u) - want_uint8), 1.5)


def raw_records(name, data_dir, split):
    """The (mocked) split as stored, read with tfds itself: uint8 images [N, H, W, C] and
    labels (None without a "label" feature)."""
    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.array([r["label"] for r in records]) if "label" in records[0] else None
    return images, labels


@pytest.mark.parametrize(
    "name,image_size,shape",
    [
        ("mnist", 28, (28, 28, 1)),  # native size: no resize
        ("cifar10", 16, (16, 16, 3)),  # resized 32 -> 16
    ],
)
def test_mocked_named_dataset(tmp_path, no_network, name, image_size, shape):
    """tfds' mock gives random (seeded, deterministic) uint8 pixels: the pipeline's values
    must be those records, resized by PIL bilinear (checked against an independent
    implementation of its 2x reduction) and mapped to x / 127.5 - 1."""
    cfg = make_cfg(tmp_path, name=name, image_size=image_size, random_flip=True)
    with tfds.testing.mock_data(num_examples=48):
        spec = data.dataset_spec(cfg)
        assert spec == data.DatasetSpec(
            name=name, image_shape=shape, num_classes=10, num_examples=48
        )
        raw, raw_labels = raw_records(name, tmp_path, "test")
        want = raw if raw.shape[1] == image_size else shrink2(raw)
        assert want.shape == (48, *shape) and raw.std() > 30  # random pixels, not constant
        images, labels = data.load_split_arrays(cfg, "test")  # stored order, unflipped
        assert images.dtype == np.float32 and images.shape == (48, *shape)
        assert_pixels(images, want)
        np.testing.assert_array_equal(labels, raw_labels)
        train_raw, train_labels = raw_records(name, tmp_path, "train")
        train_want = train_raw if train_raw.shape[1] == image_size else shrink2(train_raw)
        it = data.create_train_iterator(cfg, batch_size=16, seed=0)
        for batch in take(it, 4):  # crosses an epoch (3 steps per epoch)
            assert batch["image"].shape == (16, *shape) and batch["image"].dtype == np.float32
            assert batch["label"].dtype == np.int32
            # Each row is some record (with its label), resized, possibly mirrored.
            u = (batch["image"].astype(np.float64) + 1.0) * 127.5
            for row, label in zip(u, batch["label"]):
                err = np.minimum(
                    np.abs(row - train_want).max(axis=(1, 2, 3)),
                    np.abs(row[:, ::-1] - train_want).max(axis=(1, 2, 3)),
                )
                j = int(np.argmin(err))
                assert err[j] <= 1.001 and label == train_labels[j], (err[j], label)


def test_center_crop_then_resize_non_square():
    """Non-square named-dataset images are cut to their centred square, then resized."""
    rng = np.random.default_rng(0)
    wide = (rng.permutation(60) * 4).astype(np.uint8).reshape(6, 10, 1)  # distinct pixels
    crop_only = data_transforms.PrepareExample(6, crop=True, has_label=True)
    out = crop_only({"image": wide, "label": 3})
    np.testing.assert_array_equal(out["image"], wide[:, 2:8])  # columns (10 - 6) / 2 ..
    assert out["label"] == 3 and out["label"].dtype == np.int32
    tall = wide.transpose(1, 0, 2)  # 10 x 6: rows 2..7
    np.testing.assert_array_equal(crop_only({"image": tall, "label": 0})["image"], tall[2:8])
    # Crop 6x6, then PIL bilinear 6 -> 3 (independent 2x reduction): not a squashed resize
    # of the whole 6x10 image, nor a resize before cropping.
    shrunk = data_transforms.PrepareExample(3, crop=True, has_label=False)({"image": wide})
    assert shrunk["image"].shape == (3, 3, 1) and shrunk["label"] == 0
    np.testing.assert_array_less(np.abs(shrunk["image"] - shrink2(wide[:, 2:8])), 1.5)
    # Digits (crop=False) are never cropped: a square image is only resized.
    square = wide[:, :6]
    np.testing.assert_array_equal(
        data_transforms.PrepareExample(6, crop=False, has_label=False)({"image": square})["image"],
        square,
    )


@pytest.mark.parametrize("image_size", [178, 89])
def test_mocked_non_square_dataset_is_center_cropped(tmp_path, no_network, image_size):
    """celeb_a (218 x 178, no labels) through the whole pipeline: rows 20..197 are kept,
    then resized (178: unchanged; 89: PIL's 2x reduction, checked independently)."""
    cfg = make_cfg(tmp_path, name="celeb_a", image_size=image_size, split="test")
    with tfds.testing.mock_data(num_examples=3):
        spec = data.dataset_spec(cfg)
        assert spec == data.DatasetSpec(
            name="celeb_a", image_shape=(image_size, image_size, 3), num_classes=0, num_examples=3
        )
        raw, raw_labels = raw_records("celeb_a", tmp_path, "test")
        assert raw.shape == (3, 218, 178, 3) and raw_labels is None
        square = raw[:, 20:198]  # (218 - 178) / 2 = 20
        want = square if image_size == 178 else shrink2(square)
        images, labels = data.load_split_arrays(cfg, "test")
        assert images.shape == (3, image_size, image_size, 3)
        assert_pixels(images, want)
        np.testing.assert_array_equal(labels, np.zeros(3, np.int32))
