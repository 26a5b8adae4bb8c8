"""The sample CLI's edit modes on a tiny trained workdir, and its one-line input errors.

One class-conditional tiny model is trained per module (~40 s); each CLI call is a fresh
process (a few seconds plus compilation), so there are few of them. The samplers' math is
tested against oracles elsewhere; here: flags, file formats, shapes, exact known pixels.
"""

import json
import os
import re
import shutil

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


def _rms(a, b):
    """RMS difference of two uint8 image arrays in [-1, 1] units."""
    return float(np.sqrt(np.mean(((a.astype(np.float64) - b.astype(np.float64)) / 127.5) ** 2)))


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
    assert "(img2img, 4 images" in stdout and os.path.exists(png)
    assert "sampler dpmpp_2m, 4 steps" in stdout and "strength 0.6" in stdout
    res = np.load(out)
    assert res["images"].shape == (4, 8, 8, 1) and res["images"].dtype == np.uint8
    np.testing.assert_array_equal(res["labels"], [7, 7, 7, 7])
    # strength 0.6 of the 4 logsnr steps (indices 99, 67, 17, 0) runs the last 2: the inputs
    # are noised to index 17, sqrt(1 - ab) / sqrt(ab) = 0.62 noise per unit of signal, which
    # this barely trained model cannot remove, so the outputs are far from the (cycled)
    # inputs: measured RMS 0.46 in [-1, 1] units. Strength 0 returns them (next test).
    cycled = np.stack([np.asarray(Image.open(pngs[i % 2]))[..., None] for i in range(4)])
    assert _rms(res["images"], cycled) > 0.2


def test_img2img_strength_0_returns_the_inputs(workdir, inputs, tmp_path):
    """--strength=0 runs no step: the outputs are the input PNGs. Exact: PNG is lossless
    and uint8 -> [-1, 1] -> uint8 is off by far less than the 0.5 that rounding absorbs.
    ddpm: the reported step count is the schedule's T (100), not --config.sampler.num_steps."""
    images, _, pngs = inputs
    out = str(tmp_path / "o.npz")
    stdout = sample(
        workdir,
        "--mode=img2img",
        f"--input={','.join(pngs)}",
        "--strength=0",
        "--config.sampler.name=ddpm",
        f"--npz={out}",
        f"--out={tmp_path / 'o.png'}",
    )
    assert "sampler ddpm, 100 steps" in stdout and "strength 0.0" in stdout, stdout
    np.testing.assert_array_equal(np.load(out)["images"], images)


def test_respaced_ddpm_img2img_runs_its_steps(workdir, inputs, tmp_path):
    """--config.sampler.respacing=N: DDPM over N respaced steps, reported and named so;
    strength 0.5 runs half of them, so the outputs move off the inputs."""
    images, _, pngs = inputs
    out = str(tmp_path / "o.npz")
    stdout = sample(
        workdir,
        "--mode=img2img",
        f"--input={','.join(pngs)}",
        "--strength=0.5",
        "--config.sampler.name=ddpm",
        "--config.sampler.respacing=6",
        f"--npz={out}",
    )
    assert "sampler ddpm, 6 steps" in stdout, stdout
    assert os.path.exists(os.path.join(workdir, "samples", "img2img_ddpm6.png"))
    assert _rms(np.load(out)["images"], images) > 0.01


def test_inpaint_npz_with_named_mask_and_repaint(workdir, inputs, tmp_path):
    images, npz, _ = inputs
    out = str(tmp_path / "o.npz")
    stdout = sample(
        workdir,
        "--mode=inpaint",
        f"--input={npz}",
        "--mask=top",
        "--config.sampler.name=heun",
        "--repaint_resample=2",
        "--repaint_jump=2",
        f"--npz={out}",
    )
    assert "sampler heun, 4 steps" in stdout and "repaint 2x2" in stdout, stdout
    res = np.load(out)
    assert res["images"].shape == images.shape
    np.testing.assert_array_equal(res["images"][:, :4], images[:, :4])  # known: exact
    np.testing.assert_array_equal(res["labels"], [1, 2, 3])  # the .npz's own labels
    assert os.path.exists(os.path.join(workdir, "samples", "inpaint_heun4.png"))


def _round_trip_rms(stdout):
    m = re.search(r"round-trip \(same labels\) RMS (\d+\.\d+) in \[-1, 1\] units", stdout)
    assert m, stdout
    return float(m.group(1))


def test_invert_edits_and_reports_round_trip(workdir, inputs, tmp_path):
    """Inversion under the .npz's labels (1, 2, 3), regeneration under --labels=5; the
    reported round trip regenerates under 1, 2, 3 instead, which a second run (no --labels)
    writes out, so the reported RMS can be recomputed from its images."""
    images, npz, _ = inputs
    out, back = str(tmp_path / "o.npz"), str(tmp_path / "back.npz")
    stdout = sample(workdir, "--mode=invert", f"--input={npz}", "--labels=5", f"--npz={out}")
    assert "sampler ddim, 4 steps" in stdout, stdout
    res = np.load(out)
    assert res["images"].shape == images.shape
    np.testing.assert_array_equal(res["labels"], [5, 5, 5])
    rms = _round_trip_rms(stdout)
    stdout = sample(workdir, "--mode=invert", f"--input={npz}", f"--npz={back}")
    np.testing.assert_array_equal(np.load(back)["labels"], [1, 2, 3])
    # the same round trip either way (same inputs, labels and batch: deterministic)
    assert _round_trip_rms(stdout) == rms
    # the reported RMS is that of these images, which are rounded to uint8 (<= 0.5/127.5
    # per pixel: the RMS moves by <= 0.004) and clipped to [-1, 1]; the inputs lie inside,
    # so clipping only shrinks errors (measured: 0.109 from the .npz, 0.131 reported), and
    # the printed value has 4 decimals
    assert _rms(np.load(back)["images"], images) <= rms + 0.5 / 127.5 + 1e-4
    # Bound. One inverted DDIM step t -> t' uses eps at the start point, the sampler's step
    # back eps at the end point; for a model whose eps hardly depends on x the sampler's
    # later steps just divide by sqrt(ab), so the round trip is off by the sum over steps
    # of |sigma/alpha(t') - sigma/alpha(t)| |delta eps|, at most sigma/alpha at the largest
    # index (75 here: 21.4) times the largest |delta eps|. A zero-output model (this UNet's
    # zero-initialised conv_out, before training) is exact. After 8 Adam steps of <= 2e-4
    # this model's eps is ~0.02 RMS and changes ~0.006 within a step: measured RMS 0.13.
    # 0.3 allows delta eps up to 0.014. An inversion that skips a step leaves x off by a
    # ratio of sqrt(ab)s: 25 -> 50 skipped gives x * (a(25)/a(50) - 1) ~ 1.7 x (RMS ~1.0 on
    # these uniform inputs, RMS 0.58), the last one (50 -> 75) ~4.5 x.
    assert rms < 0.3, rms


def _png(path, size=8):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return str(path)


def _truncated_png(path):
    """A valid PNG cut after 40 bytes: PIL opens it (lazily) and fails on decode."""
    data = open(_png(path), "rb").read()[:40]
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _bad_case(case, workdir, tmp):
    """(module, args, words the error line must hold) of one bad-input case."""
    png = f"--input={_png(tmp / 'x.png')}"
    afile = tmp / "afile"  # a regular file where a directory is needed
    afile.write_text("not a directory")
    sample, evaluate = "diffusion_jax.sample", "diffusion_jax.evaluate"
    if case == "size":
        return (
            sample,
            ["--mode=inpaint", "--mask=left", f"--input={_png(tmp / 'y.png', 16)}"],
            ["16x16x1"],
        )
    if case == "channels":
        np.savez(tmp / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
        return sample, ["--mode=inpaint", "--mask=left", f"--input={tmp / 'x.npz'}"], ["8x8x3"]
    if case == "mask":
        np.savez(tmp / "m.npz", mask=np.ones((4, 4)))
        return sample, ["--mode=inpaint", png, f"--mask={tmp / 'm.npz'}"], ["--mask is 4x4x1"]
    if case in ("num_samples_zero", "num_samples_negative", "batch_size_zero"):
        flag = {"num_samples_zero": "--num_samples=0", "num_samples_negative": "--num_samples=-3"}
        flag = flag.get(case, "--batch_size=0")
        return sample, [flag], [flag.split("=")[0], "must be >= 1", f"got {flag.split('=')[1]}"]
    if case == "empty_npz":
        np.savez(tmp / "e.npz", images=np.zeros((0, 8, 8, 1), np.uint8))
        return (
            sample,
            ["--mode=img2img", f"--input={tmp / 'e.npz'}"],
            [f"{tmp / 'e.npz'} holds no images"],
        )
    if case == "corrupt_npz":
        np.savez(tmp / "c.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
        (tmp / "c.npz").write_bytes((tmp / "c.npz").read_bytes()[:60])
        return (
            sample,
            ["--mode=img2img", f"--input={tmp / 'c.npz'}"],
            [f"--input {tmp / 'c.npz'} is not a readable .npz ("],
        )
    if case in ("truncated_png", "text_as_png"):
        bad = tmp / "bad.png"
        if case == "truncated_png":
            _truncated_png(bad)
        else:
            bad.write_text("not an image")
        return (
            sample,
            ["--mode=img2img", f"--input={bad}"],
            [f"--input {bad} is not a readable PNG ("],
        )
    if case == "truncated_mask_png":
        bad = _truncated_png(tmp / "m.png")
        return (
            sample,
            ["--mode=inpaint", png, f"--mask={bad}"],
            [f"--mask {bad} is not a readable PNG ("],
        )
    if case == "out_under_file":
        return sample, [f"--out={afile / 'out.png'}"], ["--out's directory", "file is in the way"]
    if case == "npz_under_file":
        return sample, [f"--npz={afile / 'sub' / 'o.npz'}"], ["--npz", "file is in the way"]
    if case == "out_not_writable":
        return sample, ["--out=/sys/forbidden/out.png"], ["/sys/forbidden", "not writable"]
    if case == "out_is_directory":
        return sample, [f"--out={tmp}"], ["--out", "is a directory"]
    if case == "out_bad_extension":
        return sample, [f"--out={tmp / 'grid.xyz'}"], ["unknown image extension '.xyz'"]
    if case == "default_out_blocked":
        wd = tmp / "wd"  # a trained workdir whose samples/ is a file
        shutil.copytree(workdir, wd)
        shutil.rmtree(wd / "samples", ignore_errors=True)
        (wd / "samples").write_text("not a directory")
        return sample, [f"--workdir={wd}"], ["default --out directory", "file is in the way"]
    # evaluate: checked before loading anything (a missing workdir is reported after them)
    fast = ["--num_samples=4", "--config.sampler.num_steps=2", f"--cache_dir={tmp / 'cache'}"]
    if case == "eval_num_samples_zero":
        return (
            evaluate,
            [f"--workdir={tmp / 'nowhere'}", "--num_samples=0"],
            ["num_samples must be >= 2, got 0"],
        )
    if case == "eval_batch_size_zero":
        return (
            evaluate,
            [f"--workdir={tmp / 'nowhere'}", "--batch_size=0"],
            ["batch_size must be >= 1, got 0"],
        )
    if case == "eval_out_under_file":
        return evaluate, [*fast, f"--out={afile / 'e.jsonl'}"], ["--out", "file is in the way"]
    if case == "eval_out_is_directory":
        return evaluate, [*fast, f"--out={tmp}"], ["--out", "is a directory"]
    assert case == "eval_out_not_writable", case
    return evaluate, [*fast, "--out=/sys/forbidden/e.jsonl"], ["/sys/forbidden", "not writable"]


def _files(*roots):
    return {os.path.join(d, f) for root in roots for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize(
    "case",
    [
        "size",
        "channels",
        "mask",
        "num_samples_zero",
        "num_samples_negative",
        "batch_size_zero",
        "empty_npz",
        "corrupt_npz",
        "truncated_png",
        "text_as_png",
        "truncated_mask_png",
        "out_under_file",
        "npz_under_file",
        "out_not_writable",
        "out_is_directory",
        "out_bad_extension",
        "default_out_blocked",
        "eval_num_samples_zero",
        "eval_batch_size_zero",
        "eval_out_under_file",
        "eval_out_is_directory",
        "eval_out_not_writable",
    ],
)
def test_bad_inputs_give_one_line_errors(workdir, tmp_path, case):
    """Bad input: one stderr line ``error: ...`` naming the problem, exit code 2, before
    any sampling, and nothing written (outputs are checked before, not after, sampling)."""
    module, args, expected = _bad_case(case, workdir, tmp_path)
    before = _files(tmp_path, workdir)
    r = run(module, f"--workdir={workdir}", *args)  # a --workdir in args wins (absl: last)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert r.stdout == ""
    assert _files(tmp_path, workdir) == before


def test_a_workdir_from_before_newer_config_keys_still_samples(workdir, tmp_path):
    """A config.json written before keys were added to configs/base.py (here: no
    sampler.respacing, model.unet.time_cos_first, consistency block) loads with their
    defaults, which keep what the run did."""
    old = str(tmp_path / "old")
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("samples", "lock"))
    path = os.path.join(old, "config.json")
    config = json.load(open(path))
    del config["sampler"]["respacing"], config["model"]["unet"]["time_cos_first"]
    del config["consistency"]
    json.dump(config, open(path, "w"))
    stdout = sample(old, "--num_samples=2", f"--npz={tmp_path / 'o.npz'}")
    assert "sampler ddim, 4 steps" in stdout
    assert np.load(tmp_path / "o.npz")["images"].shape == (2, 8, 8, 1)
