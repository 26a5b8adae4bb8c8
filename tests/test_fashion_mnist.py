"""Fashion-MNIST: the IDX reader, the TFDS builder built from tiny IDX files written here,
``data.resize_method="pad"`` through the whole pipeline, the fallbacks and error messages
when there is no source, and the Fashion-MNIST classifier feature net on the tiny data.

Nothing here reads the real dataset (``/usr/share/datasets/fashion-mnist`` may or may not
be installed) or the network: every test empties ``fashion_mnist.SEARCH_DIRS``, points
``$DIFFUSION_JAX_FASHION_MNIST_DIR`` at its own files and patches the sockets to refuse.
The IDX files are written with ``struct`` from the format's definition, independently of
the reader.
"""

import gzip
import os
import socket
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data, data_transforms, datasets, evaluation as ev
from diffusion_jax.datasets import fashion_mnist as fm
from diffusion_jax.evaluation import extractor, fashion_net

NUM_TRAIN, NUM_TEST = 120, 30


def write_idx(path, array, magic):
    """IDX: big-endian uint32 magic, big-endian uint32 dims, then the uint8 data."""
    array = np.asarray(array, np.uint8)
    raw = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if str(path).endswith(".gz") else raw)


def tiny_split(n, seed):
    """Learnable images: class k has a bright bar at rows 2k+3..2k+4 over noise < 64."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) * 7 + seed) % 10
    images = rng.integers(0, 64, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k + 3 : 2 * k + 5, 4:24] = rng.integers(200, 256, (2, 20))
    return images, labels.astype(np.uint8)


def write_source(directory, *, gz_train=True, gz_test=False, seed=0):
    """The four IDX files (train gzipped, test plain by default) of a tiny dataset."""
    os.makedirs(directory, exist_ok=True)
    splits = {"train": tiny_split(NUM_TRAIN, seed), "test": tiny_split(NUM_TEST, seed + 1)}
    for split, gz in (("train", gz_train), ("test", gz_test)):
        images_stem, labels_stem = fm.IDX_FILES[split]
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(directory, images_stem + suffix), splits[split][0], 2051)
        write_idx(os.path.join(directory, labels_stem + suffix), splits[split][1], 2049)
    return splits


@pytest.fixture(autouse=True)
def offline_without_system_source(monkeypatch):
    """No real dataset, no network (the socket functions refuse)."""
    monkeypatch.setattr(fm, "SEARCH_DIRS", [])
    monkeypatch.delenv(fm.ENV_VAR, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("Fashion-MNIST tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(IDX dir, {split: (images, labels)}) of the tiny dataset."""
    directory = tmp_path_factory.mktemp("idx")
    return str(directory), write_source(directory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def with_source(source, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, source[0])
    return source[1]


def cfg(data_dir, **overrides):
    return {"name": "fashion_mnist", "data_dir": str(data_dir), "image_size": 28, **overrides}


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("name", ["plain-idx3-ubyte", "zipped-idx3-ubyte.gz"])
def test_read_idx_gzipped_or_plain(tmp_path, name):
    images, _ = tiny_split(5, 3)
    write_idx(tmp_path / name, images, 2051)
    got = fm.read_idx(str(tmp_path / name), fm.IMAGES_MAGIC)
    assert got.dtype == np.uint8 and got.shape == (5, 28, 28)
    np.testing.assert_array_equal(got, images)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda raw: struct.pack(">I", 2049) + raw[4:], "magic number 2049"),
        (lambda raw: raw[:-3], "truncated"),
        (lambda raw: raw[:10], "truncated IDX header"),
        (lambda raw: raw + b"\0", "trailing bytes"),
        (lambda raw: gzip.compress(raw)[:-20], "corrupt gzip"),  # cut short
        (lambda raw: (z := gzip.compress(raw))[:30] + bytes(20) + z[50:], "corrupt gzip"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, corrupt, match):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, tiny_split(4, 0)[0], 2051)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(fm.IdxError, match=match) as info:
        fm.read_idx(str(path), fm.IMAGES_MAGIC)
    assert str(path) in str(info.value)


def test_corrupt_source_fails_the_build_with_the_file_name(tmp_path, monkeypatch):
    directory = tmp_path / "idx"
    write_source(directory)
    labels = directory / "t10k-labels-idx1-ubyte"
    write_idx(labels, np.zeros(NUM_TEST - 1), 2049)  # one label short
    monkeypatch.setenv(fm.ENV_VAR, str(directory))
    with pytest.raises(fm.IdxError, match=f"{NUM_TEST} images but .*{labels.name} has"):
        data.dataset_spec(cfg(tmp_path / "tfds"))
    write_idx(labels, np.full(NUM_TEST, 10), 2049)  # not a class
    with pytest.raises(fm.IdxError, match="label 10 is not a class"):
        data.dataset_spec(cfg(tmp_path / "tfds"))


# --------------------------------------------------------------------------- the dataset


def test_builder_records_labels_and_index(data_dir, with_source):
    dataset, source = datasets.open_split("fashion_mnist", data_dir, "test")
    info = dataset.info
    assert info.features["label"].names == list(fm.CLASS_NAMES)
    assert (
        info.full_name == f"fashion_mnist_idx/source_{fm.source_hash(os.environ[fm.ENV_VAR])}/1.0.0"
    )
    assert os.environ[fm.ENV_VAR] in info.config_description  # the source is recorded
    assert len(source) == NUM_TEST
    images, labels = with_source["test"]
    for i in (0, 7, NUM_TEST - 1):  # stored in IDX order, with the row as "index"
        record = source[i]
        np.testing.assert_array_equal(record["image"][..., 0], images[i])
        assert record["label"] == labels[i] and record["index"] == i


@pytest.mark.parametrize("split,n", [("train", NUM_TRAIN), ("test", NUM_TEST)])
def test_pad_to_32_keeps_pixels_exactly(data_dir, with_source, split, n):
    """28 -> 32 with resize_method="pad": rows/columns 2..29 are the stored pixels as
    x / 127.5 - 1 (the same float32 arithmetic: exact), the 2-pixel border is -1."""
    c = cfg(data_dir, image_size=32, resize_method="pad")
    assert data.dataset_spec({**c, "split": split}) == data.DatasetSpec(
        name="fashion_mnist", image_shape=(32, 32, 1), num_classes=10, num_examples=n
    )
    images, labels = data.load_split_arrays(c, split)
    want, want_labels = with_source[split]
    assert images.shape == (n, 32, 32, 1)
    np.testing.assert_array_equal(
        images[:, 2:30, 2:30, 0], want.astype(np.float32) / np.float32(127.5) - np.float32(1)
    )
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(images[:, border] == -1.0)
    np.testing.assert_array_equal(labels, want_labels)
    # bilinear (the default) at the native size: the same pixels, unpadded.
    native, _ = data.load_split_arrays(cfg(data_dir), split)
    np.testing.assert_array_equal(native, images[:, 2:30, 2:30])


def test_train_iterator_pads(data_dir, with_source):
    want, want_labels = with_source["train"]
    c = cfg(data_dir, image_size=32, resize_method="pad", random_flip=True)
    it = data.create_train_iterator(c, batch_size=40, seed=0)
    seen = set()
    for _ in range(4):  # 3 steps per epoch: crosses an epoch
        batch = next(it)
        assert batch["image"].shape == (40, 32, 32, 1)
        assert np.all(batch["image"][:, :2] == -1) and np.all(batch["image"][:, :, 30:] == -1)
        u = np.rint((batch["image"][:, 2:30, 2:30, 0] + 1.0) * 127.5)
        for row, label in zip(u, batch["label"]):
            # some stored image, possibly mirrored, with its label
            match = np.flatnonzero(
                np.all(row == want, axis=(1, 2)) | np.all(row[:, ::-1] == want, axis=(1, 2))
            )
            assert len(match) == 1 and want_labels[match[0]] == label
            seen.add(int(match[0]))
    it.close()
    assert len(seen) == NUM_TRAIN  # a whole epoch of distinct images


def test_resize_method_validation(data_dir, with_source):
    with pytest.raises(ValueError, match=r"resize_method must be one of \('bilinear', 'pad'\)"):
        data.dataset_spec(cfg(data_dir, resize_method="nearest"))
    with pytest.raises(ValueError, match="28x28, larger than data.image_size=16.*never shrinks"):
        data.dataset_spec(cfg(data_dir, image_size=16, resize_method="pad"))
    # bilinear may shrink (named datasets are resized), and upscale 28 -> 32
    assert data.load_split_arrays(cfg(data_dir, image_size=14), "test")[0].shape[1:] == (14, 14, 1)


def test_center_pad_odd_margin_and_too_large():
    image = np.arange(1, 7, dtype=np.uint8).reshape(2, 3, 1)
    pad = data_transforms.PrepareExample(5, crop=True, has_label=False, pad=True)
    out = pad({"image": image})["image"]
    want = np.zeros((5, 5, 1), np.uint8)
    want[1:3, 1:4] = image  # margins: rows 1 above / 2 below, columns 1 left / 1 right
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="larger than data.image_size=2"):
        data_transforms.PrepareExample(2, crop=True, has_label=False, pad=True)({"image": image})


def test_another_source_is_another_dataset(tmp_path, data_dir, source, monkeypatch):
    """Different IDX files get their own config next to the first: never a stale copy."""
    monkeypatch.setenv(fm.ENV_VAR, source[0])
    first, _ = data.load_split_arrays(cfg(data_dir), "test")
    other_dir = tmp_path / "other"
    other = write_source(other_dir, gz_train=False, gz_test=True, seed=5)
    monkeypatch.setenv(fm.ENV_VAR, str(other_dir))
    second, labels = data.load_split_arrays(cfg(data_dir), "test")
    np.testing.assert_array_equal(np.rint((second[..., 0] + 1) * 127.5), other["test"][0])
    np.testing.assert_array_equal(labels, other["test"][1])
    assert not np.array_equal(first, second)
    assert len(fm._prepared_copies(data_dir)) == 2
    # No source and two copies: ambiguous, the error lists them.
    monkeypatch.delenv(fm.ENV_VAR)
    with pytest.raises(FileNotFoundError, match="2 copies from different sources"):
        data.dataset_spec(cfg(data_dir))


def test_single_prepared_copy_is_read_without_source(tmp_path, source, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, source[0])
    want = data.load_split_arrays(cfg(tmp_path), "train")
    monkeypatch.delenv(fm.ENV_VAR)
    got = data.load_split_arrays(cfg(tmp_path), "train")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def assert_says_both_ways(message):
    assert "apt-get install dataset-fashion-mnist" in message
    assert fm.ENV_VAR in message
    assert "tfds build fashion_mnist --data_dir=DIR --file_format=array_record" in message


def test_missing_source_says_both_ways(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    with pytest.raises(FileNotFoundError) as info:
        data.dataset_spec(cfg(data_dir))
    assert_says_both_ways(str(info.value))
    assert not data_dir.exists() or not list(data_dir.iterdir())  # nothing written
    # An explicit directory without the files is an error, not a fallback.
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{fm.ENV_VAR}=.* does not hold") as info:
        data.dataset_spec(cfg(data_dir))
    assert_says_both_ways(str(info.value))


def test_falls_back_to_tfds_fashion_mnist(tmp_path, monkeypatch):
    """No IDX files, but TFDS's own fashion_mnist prepared in the data dir (mocked: its
    records are tfds' random ones): read through the generic path."""
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=6):
        spec = data.dataset_spec(cfg(tmp_path, image_size=32, resize_method="pad"))
        assert spec == data.DatasetSpec(
            name="fashion_mnist", image_shape=(32, 32, 1), num_classes=10, num_examples=6
        )
        images, _ = data.load_split_arrays(
            cfg(tmp_path, image_size=32, resize_method="pad"), "test"
        )
        assert images.shape == (6, 32, 32, 1) and np.all(images[:, :2] == -1)


# --------------------------------------------------------------------------- classifier

TINY_RECIPE = dict(
    version=0,
    widths=(8, 16),
    feature_dim=16,
    epochs=8,
    batch_size=40,
    learning_rate=1e-2,
    weight_decay=1e-4,
    max_shift=1,
    flip=True,
    seed=0,
)


def test_fashion_classifier_on_tiny_data(tmp_path, data_dir, with_source, monkeypatch):
    """Trains on the 120 tiny images (bars are learnable: >= 90% of the 30 test images;
    measured 100%), caches, and is the default feature net of "fashion_mnist"."""
    monkeypatch.setattr(fashion_net, "_FASHION_RECIPE", TINY_RECIPE)
    cache = str(tmp_path / "cache")
    pad_cfg = cfg(data_dir, image_size=32, resize_method="pad")
    net = ev.make_extractor(pad_cfg, cache_dir=cache)
    assert net.name == "fashion_classifier" and not net.info["loaded_from_cache"]
    assert net.info["test_accuracy"] >= 0.9, net.info
    assert net.info["key"]["dataset"].startswith("fashion_mnist_idx/source_")
    assert net.version.endswith("-crop")
    again = ev.make_extractor(pad_cfg, cache_dir=cache)
    assert again.info["loaded_from_cache"] and again.version == net.version
    # Padded 32x32 images are center-cropped back to the native 28x28 ones: same features
    # (equal inputs; up to float32 reassociation between the two compiled shapes).
    padded, labels = data.load_split_arrays(pad_cfg, "test")
    native, _ = data.load_split_arrays(cfg(data_dir), "test")
    np.testing.assert_allclose(net.features(padded), again.features(native), rtol=1e-5, atol=1e-5)
    assert (net.logits(padded).argmax(-1) == labels).mean() == net.info["test_accuracy"]
    # bilinear data: the same weights, resized inputs, another version (other statistics)
    resized = fashion_net.fashion_classifier(cache, data_dir=data_dir)
    assert resized.info["loaded_from_cache"] and resized.version + "-crop" == net.version
    assert resized.features(np.zeros((3, 32, 32, 1), np.float32)).shape == (3, 16)
    assert extractor.dataset_feature_nets()["fashion_mnist"] == "fashion_classifier"
