"""Tests for diffusion_jax.data: the offline digits dataset through tfds.data_source + grain.

Everything runs offline in tmp dirs. The digits dataset is built once per module (~1-2 s).
Named datasets (mnist, cifar10, celeb_a) are tested in test_data_named.py.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from diffusion_jax import data, data_transforms

from helpers import (
    DIGITS_NUM_TEST as NUM_TEST,
    DIGITS_NUM_TRAIN as NUM_TRAIN,
    digits_data_cfg as make_cfg,
    take,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def expected_digits():
    """Independent reference: sklearn digits scaled like the builder, then to [-1, 1]."""
    digits = load_digits()
    images = np.rint(digits.images * 255.0 / 16.0)[..., None] / 127.5 - 1.0
    index = np.arange(len(images))
    train, test = index % 6 != 5, index % 6 == 5
    return (images[train], digits.target[train]), (images[test], digits.target[test])


def sorted_rows(images, labels):
    """Rows (label + pixels) in lexicographic order, to compare multisets of examples."""
    rows = np.concatenate(
        [labels[:, None].astype(np.float64), images.reshape(len(images), -1).astype(np.float64)],
        axis=1,
    )
    return rows[np.lexsort(rows.T[::-1])]


# ---------------------------------------------------------------------------------------
# The bundled dataset.


def test_digits_spec_and_split_sizes(digits_dir):
    spec = data.dataset_spec(make_cfg(digits_dir))
    assert spec == data.DatasetSpec(
        name="digits", image_shape=(8, 8, 1), num_classes=10, num_examples=NUM_TRAIN
    )
    assert data.dataset_spec(make_cfg(digits_dir, split="test")).num_examples == NUM_TEST
    # Stored as a regular TFDS array_record dataset, readable by name with tfds itself.
    source = tfds.data_source(
        "sklearn_digits", split="test", data_dir=str(digits_dir), download=False
    )
    assert len(source) == NUM_TEST
    assert list((digits_dir / "sklearn_digits" / "1.0.0").glob("*.array_record*"))


def test_digits_pixels_and_labels_match_sklearn(digits_dir):
    (train_x, train_y), (test_x, test_y) = expected_digits()
    for split, want_x, want_y in [("train", train_x, train_y), ("test", test_x, test_y)]:
        images, labels = data.load_split_arrays(make_cfg(digits_dir), split)
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.shape == (len(want_x), 8, 8, 1)
        np.testing.assert_allclose(images, want_x, atol=1e-6)  # same order as sklearn
        np.testing.assert_array_equal(labels, want_y)
    assert images.min() == -1.0 and images.max() == 1.0


def test_one_epoch_is_a_permutation_of_the_split(digits_dir):
    # 1498 = 7 * 214: a global batch of 214 covers the epoch exactly, nothing dropped.
    it = data.create_train_iterator(make_cfg(digits_dir), batch_size=214, seed=0)
    assert it.steps_per_epoch == 7
    batches = take(it, 7)
    for batch in batches:
        assert batch["image"].shape == (214, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (214,) and batch["label"].dtype == np.int32
    epoch_x = np.concatenate([b["image"] for b in batches])
    epoch_y = np.concatenate([b["label"] for b in batches])
    (train_x, train_y), _ = expected_digits()
    np.testing.assert_allclose(
        sorted_rows(epoch_x, epoch_y), sorted_rows(train_x, train_y), atol=1e-6
    )
    assert not np.array_equal(epoch_y, train_y)  # shuffled


def test_each_epoch_is_reshuffled_differently(digits_dir):
    it = data.create_train_iterator(make_cfg(digits_dir), batch_size=214, seed=0)
    epochs = [np.concatenate([b["label"] for b in take(it, 7)]) for _ in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.array_equal(epochs[a], epochs[b])
            np.testing.assert_array_equal(np.sort(epochs[a]), np.sort(epochs[b]))


def test_same_seed_same_batches_other_seed_different(digits_dir):
    cfg = make_cfg(digits_dir, random_flip=True)
    a = take(data.create_train_iterator(cfg, batch_size=32, seed=7), 5)
    b = take(data.create_train_iterator(cfg, batch_size=32, seed=7), 5)
    c = take(data.create_train_iterator(cfg, batch_size=32, seed=8), 5)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_random_flip_flips_about_half_and_only_when_asked(digits_dir):
    # The order depends on the seed only, so flipped and unflipped streams align row by row.
    steps = 14  # two epochs of 214
    plain = take(data.create_train_iterator(make_cfg(digits_dir), batch_size=214, seed=3), steps)
    flipped = take(
        data.create_train_iterator(make_cfg(digits_dir, random_flip=True), batch_size=214, seed=3),
        steps,
    )
    x = np.concatenate([b["image"] for b in plain])
    y = np.concatenate([b["image"] for b in flipped])
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in plain]), np.concatenate([b["label"] for b in flipped])
    )
    mirrored = x[:, :, ::-1]
    asymmetric = np.any(x != mirrored, axis=(1, 2, 3))
    same = np.all(y == x, axis=(1, 2, 3))
    is_flipped = np.all(y == mirrored, axis=(1, 2, 3))
    assert np.all(same | is_flipped)  # every row is the image or its mirror
    fraction = is_flipped[asymmetric].mean()
    assert 0.45 < fraction < 0.55, fraction  # 2996 draws: sd ~0.009
    # Flips are drawn per stream position, so an image's flip differs between epochs.
    first, second = is_flipped[:NUM_TRAIN], is_flipped[NUM_TRAIN:]
    assert not np.array_equal(first, second)
    # Without random_flip nothing is ever mirrored: each epoch is exactly the split.
    (train_x, train_y), _ = expected_digits()
    labels = np.concatenate([b["label"] for b in plain])
    for epoch in range(2):
        rows = slice(epoch * NUM_TRAIN, (epoch + 1) * NUM_TRAIN)
        np.testing.assert_allclose(
            sorted_rows(x[rows], labels[rows]), sorted_rows(train_x, train_y), atol=1e-6
        )


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_single_process_batches(digits_dir, process_count):
    cfg = make_cfg(digits_dir, random_flip=True)
    per_process = 96 // process_count
    single = data.create_train_iterator(cfg, batch_size=96, seed=5)
    assert single.steps_per_epoch == NUM_TRAIN // 96  # 15: the 58-example remainder is dropped
    steps = single.steps_per_epoch + 3  # crosses the epoch boundary
    want = take(single, steps)
    shards = [
        take(
            data.create_train_iterator(
                cfg, batch_size=per_process, seed=5, process_index=p, process_count=process_count
            ),
            steps,
        )
        for p in range(process_count)
    ]
    got = [
        {key: np.concatenate([shard[s][key] for shard in shards]) for key in ("image", "label")}
        for s in range(steps)
    ]
    assert_batches_equal(got, want)


def test_a_process_reads_only_its_own_rows(digits_dir, monkeypatch):
    calls = []
    original = data_transforms.PrepareExample.__call__
    main_thread = threading.get_ident()  # ignore prefetch threads of other tests' iterators
    monkeypatch.setattr(
        data_transforms.PrepareExample,
        "__call__",
        lambda self, record: (
            threading.get_ident() == main_thread and calls.append(1) or original(self, record)
        ),
    )
    it = data.create_train_iterator(
        make_cfg(digits_dir), batch_size=8, seed=0, process_index=1, process_count=4
    )
    it._batches[0]  # pylint: disable=protected-access  (the random-access batch dataset)
    assert len(calls) == 8  # not the 32 rows of the global batch


def test_state_round_trips_through_json_and_resumes_exactly(digits_dir):
    cfg = make_cfg(digits_dir, random_flip=True)
    it = data.create_train_iterator(cfg, batch_size=100, seed=1)
    take(it, 12)  # 14 steps per epoch
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 12 and it.epoch == 0
    want = take(it, 5)  # crosses into epoch 1
    fresh = data.create_train_iterator(cfg, batch_size=100, seed=1)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 5), want)
    it.set_state(state)  # rewinding a running iterator works too
    assert_batches_equal(take(it, 5), want)
    # The state is the global step: valid for another process layout of the same global batch.
    shard = data.create_train_iterator(cfg, batch_size=50, seed=1, process_index=1, process_count=2)
    shard.set_state(state)
    np.testing.assert_array_equal(next(shard)["image"], want[0]["image"][50:])
    with pytest.raises(ValueError, match="seed"):
        data.create_train_iterator(cfg, batch_size=100, seed=2).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        data.create_train_iterator(cfg, batch_size=50, seed=1).set_state(state)


def test_resize_to_16(digits_dir):
    cfg = make_cfg(digits_dir, image_size=16, random_flip=True)
    assert data.dataset_spec(cfg).image_shape == (16, 16, 1)
    batch = next(data.create_train_iterator(cfg, batch_size=64, seed=0))
    assert batch["image"].shape == (64, 16, 16, 1) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    big, _ = data.load_split_arrays(cfg, "test")
    small, _ = data.load_split_arrays(make_cfg(digits_dir), "test")
    assert big.shape == (NUM_TEST, 16, 16, 1)
    # Independent bilinear x2 (half-pixel centres, edge clamp) on the 0..255 scale; PIL's
    # fixed-point arithmetic may round differently by one uint8 step.
    pixels = (small + 1.0) * 127.5
    want = upsample2_bilinear(upsample2_bilinear(pixels, axis=1), axis=2)
    np.testing.assert_allclose((big + 1.0) * 127.5, np.rint(want), atol=1.01)


def test_pad_to_13(digits_dir):
    """resize_method="pad": digits centred unscaled on the black background (-1); the odd
    margin 13 - 8 = 5 is 2 pixels above/left and 3 below/right."""
    cfg = make_cfg(digits_dir, image_size=13, resize_method="pad", split="test")
    assert data.dataset_spec(cfg).image_shape == (13, 13, 1)
    padded, labels = data.load_split_arrays(cfg, "test")
    small, small_labels = data.load_split_arrays(make_cfg(digits_dir), "test")
    assert padded.shape == (NUM_TEST, 13, 13, 1)
    np.testing.assert_array_equal(padded[:, 2:10, 2:10], small)  # the same float32 values
    inside = np.zeros((13, 13), bool)
    inside[2:10, 2:10] = True
    assert np.all(padded[:, ~inside] == -1.0)
    np.testing.assert_array_equal(labels, small_labels)
    batch = next(data.create_train_iterator(cfg, batch_size=32, seed=0))
    assert batch["image"].shape == (32, 13, 13, 1) and np.all(batch["image"][:, ~inside] == -1)
    with pytest.raises(ValueError, match="resize_method"):
        data.dataset_spec(make_cfg(digits_dir, resize_method="bicubic"))


def upsample2_bilinear(x, axis):
    size = x.shape[axis]
    centres = np.arange(2 * size) / 2.0 - 0.25  # output pixel centres in input coordinates
    lo = np.floor(centres).astype(int)
    frac = centres - lo
    take_lo = np.take(x, np.clip(lo, 0, size - 1), axis=axis)
    take_hi = np.take(x, np.clip(lo + 1, 0, size - 1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = 2 * size
    frac = frac.reshape(shape)
    return take_lo * (1 - frac) + take_hi * frac


def test_config_validation(digits_dir):
    with pytest.raises(ValueError, match="image_size"):
        data.dataset_spec(make_cfg(digits_dir, image_size=4))
    with pytest.raises(ValueError, match="exceeds"):
        data.create_train_iterator(make_cfg(digits_dir), batch_size=1000, seed=0, process_count=2)
    with pytest.raises(ValueError, match="process_index"):
        data.create_train_iterator(
            make_cfg(digits_dir), batch_size=8, seed=0, process_index=2, process_count=2
        )
    # A plain dict works as well as a ConfigDict; worker_count may be omitted.
    plain = dict(
        name="digits", data_dir=str(digits_dir), split="test", image_size=8, random_flip=False
    )
    assert data.dataset_spec(plain).num_examples == NUM_TEST


# ---------------------------------------------------------------------------------------
# Separate processes: no TensorFlow, racing builds, grain worker processes.


_CHILD = textwrap.dedent("""
    import hashlib, sys
    import ml_collections
    from diffusion_jax import data
    cfg = ml_collections.ConfigDict(dict(name="digits", data_dir=sys.argv[1], split="train",
                                         image_size=16, random_flip=True, worker_count=0))
    spec = data.dataset_spec(cfg)
    it = data.create_train_iterator(cfg, batch_size=32, seed=0)
    digest = hashlib.sha256()
    for _ in range(3):
      digest.update(next(it)["image"].tobytes())
    x, y = data.load_split_arrays(cfg, "test")
    assert x.shape == (299, 16, 16, 1), x.shape
    assert "tensorflow" not in sys.modules, "tensorflow was imported"
    print("RESULT", spec.num_examples, digest.hexdigest())
""")


def test_concurrent_builds_agree_and_never_import_tensorflow(tmp_path):
    """Two processes build the same fresh data_dir at once; both succeed, same data, no TF."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-3000:]
        results.append([line for line in out.splitlines() if line.startswith("RESULT")])
    assert results[0] == results[1] and results[0][0].split()[1] == str(NUM_TRAIN)
    assert not list(tmp_path.glob("sklearn_digits/*incomplete*"))


def test_worker_processes_give_the_same_batches(digits_dir):
    cfg = make_cfg(digits_dir, random_flip=True)
    want = take(data.create_train_iterator(cfg, batch_size=64, seed=2), 4)
    it = data.create_train_iterator(
        make_cfg(digits_dir, random_flip=True, worker_count=1), batch_size=64, seed=2
    )
    try:
        take(it, 1)
        it.set_state({"step": 0})
        got = take(it, 4)
    finally:
        it.close()
    assert_batches_equal(got, want)
    assert type(got[0]["image"]) is np.ndarray  # plain arrays, not shared-memory views


def test_a_data_dir_under_home_is_expanded(tmp_path, monkeypatch):
    """``datasets.open_split`` with ``data.DEFAULT_DATA_DIR``'s "~/..." spelling reads and
    builds under the home directory, never in a directory literally named "~" under the
    working directory (glyph_net.real_split_accuracy passes that spelling)."""
    from diffusion_jax import datasets
    from diffusion_jax.datasets import digits

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    builder, source = datasets.open_split(digits.NAME, os.path.join("~", "tfds"), "test")
    assert str(builder.data_dir).startswith(str(tmp_path / "home" / "tfds")), builder.data_dir
    assert len(source) > 0 and not (tmp_path / "~").exists()
