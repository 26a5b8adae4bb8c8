"""Multi-host training with JAX's own multi-controller runtime, on one machine: two local
processes x 4 CPU devices (gloo collectives over 127.0.0.1) must train to the same
parameters as one process x 8 devices with the same global batch."""

import os
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from helpers import REPO, hold_lock, load_state

STEPS = 4
TIMEOUT_S = 600  # per launch; each process compiles the tiny model (~20-90 s on 2 cores)


def xla_flags(devices_per_process):
    """The suite's XLA_FLAGS (conftest.py) with another fake device count."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])


def start(workdir, mode, num_processes, devices_per_process):
    """Launch the tiny config's training as ``num_processes`` local processes."""
    port = portpicker.pick_unused_port()
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags(devices_per_process))
    args = [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.train.parallel={mode}",
        f"--config.train.num_steps={STEPS}",
        f"--config.ckpt.every_steps={STEPS}",
        "--config.eval.num_samples=8",
    ]
    if num_processes > 1:
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    return [
        subprocess.Popen(
            args + ([f"--process_id={i}"] if num_processes > 1 else []),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]


def finish(procs):
    """Wait (bounded) for every process; fail with the output of all of them."""
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    for p in procs:
        try:
            out = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()[0] + f"\n[killed after {TIMEOUT_S} s]"
        outputs.append(out)
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs))
    )
    return outputs


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_two_processes_equal_one_process(tmp_path, mode):
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    # the 1-process reference runs beside the 2 processes: XLA compiles on one thread, so
    # the three share the 2 cores better than two launches one after the other
    reference = start(one, mode, num_processes=1, devices_per_process=8)
    outs = finish(start(two, mode, num_processes=2, devices_per_process=4))
    finish(reference)
    assert "process 1 of 2" in outs[1]
    a, b = load_state(one, STEPS), load_state(two, STEPS)
    assert int(a.step) == int(b.step) == STEPS
    # Same per-example draws and data rows; only the all-reduce (in-process vs gloo)
    # may sum in another order: float32 agreement to 1e-5 after 4 Adam steps.
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    # only process 0 writes samples (gathered from all devices of both processes)
    assert os.listdir(os.path.join(two, "samples")) == [f"step_{STEPS:07d}.png"]


def test_a_busy_workdir_refuses_every_process(tmp_path):
    """One lock for the run: process 0 finds the workdir in use and both processes stop
    with its one-line refusal (none hangs at a barrier, none trains)."""
    wd = str(tmp_path / "wd")
    os.makedirs(wd)
    holder = hold_lock(wd)
    try:
        procs = start(wd, "jit", num_processes=2, devices_per_process=4)
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        holder.kill()
        holder.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 2, out[-3000:]
        assert f"in use by another training run (pid {holder.pid}" in out, out[-3000:]
    assert sorted(os.listdir(wd)) == ["lock"]  # nothing written
