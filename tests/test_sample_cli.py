"""The sample CLI's edit modes on a tiny trained workdir, and its one-line input errors.

One class-conditional tiny model is trained per module (~40 s); each CLI call is a fresh
process (a few seconds plus compilation), so there are few of them. The samplers' math is
tested against oracles elsewhere; here: flags, file formats, shapes, exact known pixels.
"""

import os

import numpy as np
import pytest
from PIL import Image

from helpers import cli as run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("cli") / "wd")
    r = run(
        "diffusion_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={wd}",
        "--config.model.num_classes=10",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three 8x8 grayscale uint8 images with labels, as .npz and as PNG files."""
    d = tmp_path_factory.mktemp("inputs")
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    npz = str(d / "in.npz")
    np.savez(npz, images=images, labels=np.array([1, 2, 3], np.int32))
    pngs = []
    for i, img in enumerate(images):
        pngs.append(str(d / f"in{i}.png"))
        Image.fromarray(img[..., 0]).save(pngs[-1])
    return images, npz, pngs


def sample(workdir, *args):
    r = run("diffusion_jax.sample", f"--workdir={workdir}", "--config.sampler.num_steps=4", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_img2img_from_pngs(workdir, inputs, tmp_path):
    _, _, pngs = inputs
    out, png = str(tmp_path / "o.npz"), str(tmp_path / "o.png")
    stdout = sample(
        workdir,
        "--mode=img2img",
        f"--input={','.join(pngs[:2])}",
        "--num_samples=4",
        "--strength=0.6",
        "--config.sampler.name=dpmpp_2m",
        "--config.sampler.spacing=logsnr",
        "--config.sampler.guidance_scale=2",
        "--guidance_interval=10,80",
        "--guidance_rescale=0.5",
        "--labels=7",
        f"--npz={out}",
        f"--out={png}",
    )
    assert "img2img" in stdout and os.path.exists(png)
    res = np.load(out)
    assert res["images"].shape == (4, 8, 8, 1) and res["images"].dtype == np.uint8
    np.testing.assert_array_equal(res["labels"], [7, 7, 7, 7])


def test_inpaint_npz_with_named_mask_and_repaint(workdir, inputs, tmp_path):
    images, npz, _ = inputs
    out = str(tmp_path / "o.npz")
    sample(
        workdir,
        "--mode=inpaint",
        f"--input={npz}",
        "--mask=top",
        "--config.sampler.name=heun",
        "--repaint_resample=2",
        "--repaint_jump=2",
        f"--npz={out}",
    )
    res = np.load(out)
    assert res["images"].shape == images.shape
    np.testing.assert_array_equal(res["images"][:, :4], images[:, :4])  # known: exact
    np.testing.assert_array_equal(res["labels"], [1, 2, 3])  # the .npz's own labels
    assert os.path.exists(os.path.join(workdir, "samples", "inpaint_heun4.png"))


def test_invert_edits_and_reports_round_trip(workdir, inputs, tmp_path):
    images, npz, _ = inputs
    out = str(tmp_path / "o.npz")
    stdout = sample(workdir, "--mode=invert", f"--input={npz}", "--labels=5", f"--npz={out}")
    assert "round-trip (same labels) RMS" in stdout
    res = np.load(out)
    assert res["images"].shape == images.shape
    np.testing.assert_array_equal(res["labels"], [5, 5, 5])


@pytest.mark.parametrize("case", ["size", "channels", "mask"])
def test_bad_inputs_give_one_line_errors(workdir, tmp_path, case):
    args = ["--mode=inpaint", "--mask=left"]
    if case == "size":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "x.png")
        args.append(f"--input={tmp_path / 'x.png'}")
        expected = "16x16x1"
    elif case == "channels":
        np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
        args.append(f"--input={tmp_path / 'x.npz'}")
        expected = "8x8x3"
    else:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
        np.savez(tmp_path / "m.npz", mask=np.ones((4, 4)))
        args = ["--mode=inpaint", f"--input={tmp_path / 'x.png'}", f"--mask={tmp_path / 'm.npz'}"]
        expected = "--mask is 4x4x1"
    r = run("diffusion_jax.sample", f"--workdir={workdir}", *args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
