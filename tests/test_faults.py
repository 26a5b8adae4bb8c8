"""Workdir safety and error hygiene, tried as a careless or hostile user would.

Every refusal is one ``error: ...`` line on stderr with exit code 2, given before anything
is written or compiled, and nothing the user already has is lost: a second writer is
refused while the first holds the workdir's lock, a changed config never replaces the
workdir's record of how it was trained, a config file's typo is an error, a full disk ends
the run with one line and the previous checkpoint intact, a preempted run exits with its
own code (75). Most cases run the real CLI in a subprocess (a few seconds each: they stop
before compiling); the ones that need a trained workdir share one 4-step run.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from diffusion_jax import data, preemption, workdir
from diffusion_jax.lock import LOCK_FILE

from helpers import REPO, cli, hold_lock, tiny_config

TRAIN = ("diffusion_jax.main", "--config=configs/tiny.py")


def one_line_error(r, *words):
    """``r`` failed with exit code 2 and exactly one stderr line, ``error: ...`` holding
    every one of ``words``; returns the line."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(path):
    """{relative path: bytes} of every file under ``path`` but the lock (whose holder
    description every run rewrites): what "nothing was lost" means."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            if name == LOCK_FILE and root == path:
                continue
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained for 4 steps (checkpoint at step 4); copy it before changing it."""
    wd = str(tmp_path_factory.mktemp("trained") / "wd")
    r = cli(*TRAIN, f"--workdir={wd}", "--config.train.num_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


@pytest.fixture
def wd(trained, tmp_path):
    path = str(tmp_path / "wd")
    shutil.copytree(trained, path)
    return path


# ------------------------------------------------------------------------ the lock


def test_second_writer_is_refused_naming_the_first(wd):
    before = snapshot(wd)
    holder = hold_lock(wd)
    try:
        r = cli(*TRAIN, f"--workdir={wd}", "--config.train.num_steps=8")
    finally:
        holder.kill()
        holder.wait()
    line = one_line_error(r, "in use by another training run", f"pid {holder.pid}")
    assert f"on host {socket.gethostname()}" in line and "started " in line
    assert snapshot(wd) == before  # nothing written: no config.json, checkpoint or metrics change


def test_lock_of_a_killed_run_does_not_block_its_resume(wd):
    holder = hold_lock(wd)
    holder.send_signal(signal.SIGKILL)  # the lock file stays, with a dead pid in it
    holder.wait()
    with open(os.path.join(wd, LOCK_FILE)) as f:
        assert json.load(f)["pid"] == holder.pid
    r = cli(*TRAIN, f"--workdir={wd}", "--config.train.num_steps=8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 4" in r.stderr


def test_two_trainings_one_workdir_in_process(tmp_path):
    """The lock also holds between two runs in one process (flock is per open file)."""
    from diffusion_jax.lock import WorkdirLock

    with WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir.ConfigError, match=f"pid {os.getpid()}"):
            with WorkdirLock(str(tmp_path)):
                pass
    with WorkdirLock(str(tmp_path)):  # released on exit
        pass


# ------------------------------------------------------------- the config record


def test_changed_config_is_refused_and_the_record_kept(wd):
    before = snapshot(wd)
    r = cli(*TRAIN, f"--workdir={wd}", "--config.optim.learning_rate=0.001")
    one_line_error(r, "optim.learning_rate (0.0002 -> 0.001)", "fresh --workdir")
    after = snapshot(wd)
    assert after == before  # config.json (and everything else) untouched
    assert workdir.load_config(wd).optim.learning_rate == 2e-4


def test_resumable_keys_may_change_and_are_recorded(wd):
    r = cli(
        *TRAIN,
        f"--workdir={wd}",
        "--config.train.num_steps=8",
        "--config.train.log_every_steps=2",
        "--config.sampler.num_steps=3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 4" in r.stderr
    saved = workdir.load_config(wd)
    assert (saved.train.num_steps, saved.sampler.num_steps) == (8, 3)


def test_other_model_without_config_record_is_one_line(wd):
    """With config.json gone, the checkpoint's own tree still refuses another model."""
    os.remove(os.path.join(wd, workdir.CONFIG_FILE))
    r = cli(*TRAIN, f"--workdir={wd}", "--config.model.unet.base_channels=32")
    one_line_error(r, "different model/optimizer config", "fresh --workdir")


def test_sample_refuses_other_model_in_one_line(wd):
    r = cli("diffusion_jax.sample", f"--workdir={wd}", "--config.model.unet.base_channels=32")
    one_line_error(r, "different model/optimizer config")


def test_config_file_typo_is_an_error(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from configs import tiny\n\n\ndef get_config():\n"
        "    c = tiny.get_config()\n    c.train.nmu_steps = 3\n    return c\n"
    )
    r = cli("diffusion_jax.main", f"--config={path}", f"--workdir={tmp_path / 'wd'}")
    one_line_error(r, str(path), "'train.nmu_steps'", "did you mean 'train.num_steps'")
    assert not os.path.exists(tmp_path / "wd")


def test_python_api_checks_keys_too(tmp_path):
    c = tiny_config()
    c.train.nmu_steps = 3
    with pytest.raises(workdir.ConfigError, match="did you mean 'train.num_steps'"):
        from diffusion_jax import train

        train.train_and_evaluate(c, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd")


# ------------------------------------------------------------ one-line errors


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ["no such file"]),
        ("def get_config(:\n", ["syntax error at line 1"]),
        ("def get_config():\n    return 1 / 0\n", ["line 2", "ZeroDivisionError"]),
        ("x = 1\n", ["no get_config()"]),
    ],
    ids=["missing", "syntax", "raises", "no-get_config"],
)
def test_bad_config_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "cfg.py"
    if content is not None:
        path.write_text(content)
    r = cli("diffusion_jax.main", f"--config={path}", f"--workdir={tmp_path / 'wd'}")
    one_line_error(r, str(path), *words)
    assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.bogus=1", "'bogus'"),
        ("--config.train.nmu_steps=3", "did you mean 'num_steps'"),
        ("--config.schedule.name=cosin", "valid"),
        ("--config.train.batch_size=12", "not divisible by the 8 devices"),
        ("--config.train.parallel=pjit", "valid"),
        ("--config.model.num_classes=7", "num_classes"),
        ("--config.optim.learning_rate=-1e-4", "optim.learning_rate=-0.0001 is out of range"),
        (
            "--config.optim.ema_decay=1.0",
            "optim.ema_decay=1.0 is out of range: it must lie in [0.0, 1.0)",
        ),
    ],
)
def test_bad_override_is_one_line(tmp_path, override, message):
    r = cli(*TRAIN, f"--workdir={tmp_path / 'wd'}", override)
    one_line_error(r, message)
    assert not os.path.exists(tmp_path / "wd")


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.learning_rate", -1e-4),
        ("optim.learning_rate", 0.0),
        ("optim.ema_decay", 1.0),
        ("optim.ema_decay", -0.1),
        ("model.unet.dropout", 1.0),
        ("model.unet.dropout", -0.1),
        ("objective.label_dropout", 1.0),
        ("optim.weight_decay", -0.01),
        ("optim.grad_clip_norm", -1.0),
        ("optim.b2", 1.0),
    ],
)
def test_out_of_range_values_are_refused(key, value):
    c = tiny_config()
    section, *rest = key.split(".")
    node = c[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(workdir.ConfigError, match=f"{key}={value} is out of range"):
        workdir.check_config(c, data.dataset_spec(c.data))
    workdir.check_config(tiny_config(), data.dataset_spec(c.data))  # the defaults pass


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    r = cli(*TRAIN, f"--workdir={path}")
    one_line_error(r, "a file is in the way")
    assert path.read_text() == "mine"


def test_unwritable_workdir_is_one_line():
    # /sys refuses new entries even to root (EPERM; EROFS where it is mounted read-only)
    r = cli(*TRAIN, "--workdir=/sys/diffusion_jax_run")
    one_line_error(r, "is not writable")


# ------------------------------------------------------------------- disk full


# The training CLI under a file-size limit: writes past it fail with EFBIG (SIGXFSZ
# ignored). Set inside the child's Python, not in a preexec_fn (fork of a threaded process).
LIMITED_MAIN = (
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)), resource.RLIM_INFINITY))\n"
    "runpy.run_module('diffusion_jax.main', run_name='__main__', alter_sys=True)\n"
)


def test_failed_checkpoint_write_is_one_line_and_keeps_the_previous(wd):
    """A real write failure inside TensorStore (a file-size limit stands in for a full disk:
    the same failed write(2), no root needed): one line, the partial save removed, the
    step-4 checkpoint intact and still resumable."""
    before = snapshot(os.path.join(wd, "checkpoints"))
    limit = 64 << 10  # a checkpoint step writes files of 0.1-2 MB
    r = subprocess.run(
        [sys.executable, "-c", LIMITED_MAIN, str(limit), *TRAIN[1:], f"--workdir={wd}"]
        + ["--config.train.num_steps=8", "--config.train.compilation_cache_dir=off"],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    ckdir = os.path.join(wd, "checkpoints")
    # the resume's INFO lines and progress come first; the failure is the last line and
    # the only error (today's orbax output was thousands of lines of tracebacks)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) <= 6 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: ") and sum("error" in x.lower() for x in lines) == 1
    for word in ("file too large", f"while saving step 8 in {ckdir}", "(step 4) is intact"):
        assert word in lines[-1], lines[-1]
    assert sorted(os.listdir(ckdir)) == ["4"]  # no 8.orbax-checkpoint-tmp left
    assert snapshot(ckdir) == before
    r = cli(*TRAIN, f"--workdir={wd}", "--config.train.num_steps=8")
    assert r.returncode == 0 and "resumed from step 4" in r.stderr, r.stderr[-3000:]


# ----------------------------------------------------------------- preemption


def start_training(wd, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", *TRAIN, f"--workdir={wd}", *overrides],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(p, text):
    for line in p.stdout:
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed; exit {p.wait()}")


def test_preempted_run_exits_75_after_saving(wd):
    p = start_training(wd, "--config.train.num_steps=10000", "--config.train.log_every_steps=1")
    wait_for_line(p, "step 5/")
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == preemption.EXIT_CODE == 75, out[-3000:]
    assert "preempted at step" in out
    steps = [int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit()]
    assert max(steps) > 4


def test_sigterm_while_sampling_saves_before_the_grid_is_drawn(wd):
    """SIGTERM arrives while the step-8 sample grid (DDPM, 100 steps, 1,024 images: tens
    of seconds on 2 cores) is drawn: the run saves step 8 as soon as it sees the signal,
    writes no grid, waits for the batch in flight (exiting under it would crash) and exits
    with 75. Prints how long after the signal the save was logged and the process ended."""
    p = start_training(
        wd,
        "--config.train.num_steps=12",
        "--config.eval.every_steps=8",
        "--config.eval.num_samples=1024",
        "--config.sampler.name=ddpm",
        "--config.train.log_every_steps=1",
    )
    wait_for_line(p, "step 8/")
    time.sleep(1.0)  # into the sampling (compiling, then drawing)
    sent = time.time()
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    ended = time.time() - sent
    assert p.returncode == 75, out[-3000:]
    saved = re.search(r"^W\d{4} (\d\d):(\d\d):([\d.]+) .*while sampling: saved step 8", out, re.M)
    assert saved, out[-3000:]
    assert "8" in os.listdir(os.path.join(wd, "checkpoints"))
    assert not os.path.exists(os.path.join(wd, "samples", "step_0000008.png"))
    h, m, sec = int(saved[1]), int(saved[2]), float(saved[3])
    local = time.localtime(sent)
    logged = h * 3600 + m * 60 + sec - (local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec)
    logged -= sent % 1
    print(f"SIGTERM while sampling: saved {logged:.1f} s, exited {ended:.1f} s after the signal")


def test_sample_on_a_workdir_without_checkpoint_writes_nothing(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    workdir.save_config(tiny_config(), str(wd))
    r = cli("diffusion_jax.sample", f"--workdir={wd}")
    one_line_error(r, "no checkpoint")
    assert sorted(os.listdir(wd)) == [workdir.CONFIG_FILE]


def test_logsnr_lambda_min_that_leaves_too_few_steps_is_refused():
    # Checked with the config, before any training or sampling: the tiny config's cosine
    # schedule (T = 100, lambda(0) = 3.68, lambda(99) = -7.6) has 99 indices >= -5.1.
    c = tiny_config(**{"schedule.name": "cosine", "sampler.spacing": "logsnr"})
    spec = data.dataset_spec(c.data)
    workdir.check_config(c, spec)
    c.sampler.lambda_min = 6.0
    with pytest.raises(workdir.ConfigError, match="lambda_min=6.0 leaves no step.*lower it"):
        workdir.check_config(c, spec)
    c.sampler.lambda_min, c.sampler.num_steps = -5.1, 100
    with pytest.raises(workdir.ConfigError, match="num_steps=100 needs 100 indices, but only 99"):
        workdir.check_config(c, spec)


def test_eps_grid_that_starts_below_lambda_min_without_clipping_warns(caplog):
    # The tiny config's cosine schedule (T = 100): a trailing grid starts at index 99
    # (lambda -7.6). Unclipped (latents), an eps model's x0 there amplifies its error: the
    # config check warns with the fix; clipped (pixels), or with v-prediction, it does not.
    c = tiny_config(**{"schedule.name": "cosine", "sampler.spacing": "trailing"})
    spec = data.dataset_spec(c.data)
    pattern = r"first step is schedule index 99, where lambda .* = -7.6.*sampler.spacing=logsnr"
    for clip in (True, False):
        caplog.clear()
        c.sampler.clip_x0 = clip
        workdir.check_config(c, spec)
        found = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(found) == (not clip), found
        assert clip or re.search(pattern, found[0]), found
    c.objective.prediction = "v"
    caplog.clear()
    workdir.check_config(c, spec)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
