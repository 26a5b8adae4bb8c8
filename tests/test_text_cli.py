"""A text model end to end: train a tiny captioned UNet on glyphs_tiny through the main
CLI (caption tokens from the input pipeline, caption dropout), then sample it with
prompts, a prompts file and a negative prompt; wrong words and flags give one-line errors.
The model is far too small and short-trained to follow captions; caption following is
measured in the README, not here."""

import json
import os

import numpy as np
import pytest

from diffusion_jax.datasets import glyph_render
from diffusion_jax.tokenizer import SPECIAL_TOKENS

from helpers import cli as run

PROMPT = "a large bold upright red serif letter A on the blue background"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    wd = str(root / "wd")
    r = run(
        "diffusion_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={wd}",
        "--config.data.name=glyphs_tiny",
        f"--config.data.data_dir={root / 'data'}",
        "--config.data.image_size=8",
        f"--config.model.text.vocab_size={len(glyph_render.VOCABULARY) + len(SPECIAL_TOKENS)}",
        "--config.model.text.width=16",
        "--config.model.text.depth=1",
        "--config.model.unet.num_heads=2",
        "--config.sampler.num_steps=3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def sample(workdir, *args):
    return run("diffusion_jax.sample", f"--workdir={workdir}", *args)


def test_prompts_and_negative_prompt(workdir, tmp_path):
    npz, png = str(tmp_path / "o.npz"), str(tmp_path / "o.png")
    r = sample(workdir, f"--prompt={PROMPT}", "--num_samples=4", f"--npz={npz}", f"--out={png}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(npz)
    assert out["images"].shape == (4, 8, 8, 3) and list(out["prompts"]) == [PROMPT]
    assert out["labels"].shape == (4, 16) and (out["labels"] == out["labels"][0]).all()
    assert os.path.getsize(png) > 0
    # two prompts from a file: two rows of two; a negative prompt changes the samples
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n\nsmall green 7 on black; mono regular italic\n")
    npz2 = str(tmp_path / "p.npz")
    r = sample(workdir, f"--prompts_file={prompts}", "--num_samples=4", f"--npz={npz2}")
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = np.load(npz2)["labels"]
    assert (tokens[0] == tokens[1]).all() and (tokens[2] == tokens[3]).all()
    assert not (tokens[1] == tokens[2]).all()
    npz3 = str(tmp_path / "n.npz")
    r = sample(
        workdir,
        f"--prompt={PROMPT}",
        "--num_samples=4",
        "--negative_prompt=red A",
        "--config.sampler.guidance_scale=3",
        f"--npz={npz3}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    plain = np.load(npz)["images"].astype(int)
    assert np.abs(np.load(npz3)["images"].astype(int) - plain).max() > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt=a bolt red A"], "unknown word 'bolt' (closest known: bold"),
        (["--labels=3"], "not --labels"),
        (["--prompt=red A", "--prompts_file=x.txt"], "not both"),
        (["--prompts_file=/nonexistent.txt"], "does not exist"),
    ],
)
def test_bad_prompts_give_one_line_errors(workdir, args, message):
    r = sample(workdir, *args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_vocab_size_mismatch_names_the_value(workdir, tmp_path):
    config = json.load(open(os.path.join(workdir, "config.json")))
    want = config["model"]["text"]["vocab_size"]
    r = run(
        "diffusion_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'wd'}",
        "--config.data.name=glyphs_tiny",
        f"--config.data.data_dir={config['data']['data_dir']}",
        "--config.model.text.vocab_size=5",
    )
    assert r.returncode != 0
    assert f"--config.model.text.vocab_size={want}" in r.stderr, r.stderr[-2000:]
