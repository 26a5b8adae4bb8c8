"""Sweep definitions: a base config, axes of dotted overrides (their product is the set of
runs) and the evaluations to run on each trained workdir.

A run is named by its axis values, e.g. ``schedule.name=cosine,seed=1``; its workdir is
``<root>/<sweep>/<run name>``. The axis ``config`` picks the config file itself (runs
named by its stem, e.g. ``config=digits_dit``); the axis ``arm`` names a bundle of
overrides from ``Sweep.arms`` (an arm that changes several keys at once, e.g. a
zero-terminal-SNR schedule with v-prediction and trailing spacing).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    config: str  # config file, relative to the repo root
    axes: dict[str, tuple[Any, ...]]  # dotted key -> values
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # same for every run
    # evaluate.py flag sets run on each finished workdir, e.g. {"sampler": "ddim", "num_steps": 50}
    # ("seed": the sampling seed; "num_samples": another N than eval_samples)
    evals: tuple[dict[str, Any], ...] = ()
    eval_samples: int = 1000  # samples per evaluation (FID is biased by N: keep it fixed)
    budget: str = ""  # the CPU budget the sweep was sized for (reported)
    # arm name -> its overrides, for the ``arm`` axis
    arms: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # evaluations too costly for every run: (where, spec) runs spec on the runs whose
    # overrides contain every item of ``where`` (e.g. {"seed": 0})
    limited_evals: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = ()
    # what the runs need made once before them (e.g. the autoencoder and latent dataset a
    # latent config trains on): (workdir, ``python -m`` arguments), in order;
    # experiments.run runs each whose workdir lacks the PREPARED marker (they resume)
    prepare: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        unknown = set(self.axes.get(ARM_AXIS, ())) - set(self.arms)
        if unknown:
            raise ValueError(f"sweep {self.name}: arms {sorted(unknown)} not in Sweep.arms")

    def runs(self) -> list[dict[str, Any]]:
        """One dict of overrides (axes + fixed) per run, in a stable order."""
        keys = list(self.axes)
        return [
            dict(zip(keys, values), **self.fixed)
            for values in itertools.product(*(self.axes[k] for k in keys))
        ]

    def train_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The config overrides of a run: its axes and fixed values, the ``arm`` axis
        expanded into its bundle, the ``config`` axis left out (it picks the file)."""
        out = {}
        for k, v in overrides.items():
            if k == ARM_AXIS:
                out.update(self.arms[v])
            elif k != CONFIG_AXIS:
                out[k] = v
        return out

    def evals_for(self, overrides: dict[str, Any]) -> tuple[dict[str, Any], ...]:
        """The evaluations of one run: ``evals`` and the ``limited_evals`` it qualifies for."""
        return self.evals + tuple(
            spec
            for where, spec in self.limited_evals
            if all(overrides.get(k) == v for k, v in where.items())
        )

    def samples_of(self, spec: dict[str, Any]) -> int:
        """How many samples ``spec`` scores: its own "num_samples", else ``eval_samples``."""
        return int(spec.get("num_samples", self.eval_samples))

    def all_evals(self) -> tuple[dict[str, Any], ...]:
        """Every evaluation spec of the sweep, in report order."""
        return self.evals + tuple(spec for _, spec in self.limited_evals)

    def config_of(self, overrides: dict[str, Any]) -> str:
        """The run's config file: the ``config`` axis when the sweep has one (e.g. two
        architectures, each with its own tuned config), else ``self.config``."""
        return overrides.get(CONFIG_AXIS, self.config)

    def run_name(self, overrides: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
        """``key=value,...`` over the axes (but ``skip``: e.g. the seed, for group names)."""
        return ",".join(f"{k}={value_name(k, overrides[k])}" for k in self.axes if k not in skip)


# The axis key that picks the config file instead of overriding a config key.
CONFIG_AXIS = "config"
# The axis key whose values name bundles of overrides (Sweep.arms).
ARM_AXIS = "arm"


def value_name(key: str, value: Any) -> str:
    """How a value appears in run and group names (a config file by its stem: no "/")."""
    return os.path.splitext(os.path.basename(value))[0] if key == CONFIG_AXIS else str(value)


# Sample quality vs number of sampler steps, evaluated on every run of a sweep:
# deterministic DDIM, stochastic DDIM (eta=1) at 50 steps, full DDPM and a second-order
# solver. experiments/results/schedule_ablation was built with exactly this list; a spec
# added later runs only on its own (experiments.run skips recorded evaluations).
STEPS_AXIS = tuple(
    {"sampler": "ddim", "num_steps": n, "eta": 0.0} for n in (10, 20, 50, 100, 1000)
) + (
    {"sampler": "ddim", "num_steps": 50, "eta": 1.0},
    {"sampler": "ddpm"},
    {"sampler": "dpmpp_2m", "num_steps": 10, "spacing": "logsnr"},
    {"sampler": "dpmpp_2m", "num_steps": 20, "spacing": "logsnr"},
)

# The noise-schedule arms of issue 22: linear and cosine (Nichol & Dhariwal 2021), sigmoid
# (Chen 2023; start -3, end 3, tau 1) and zero-terminal-SNR rescaling of linear with
# v-prediction and trailing spacing (Lin et al. 2024), which is one recipe: at SNR 0 an
# eps-prediction says nothing about x0, and leading spacing never visits t = T.
SCHEDULE_ARMS = {
    "linear": {"schedule.name": "linear"},
    "cosine": {"schedule.name": "cosine"},
    "sigmoid": {"schedule.name": "sigmoid"},
    "zero_snr_v": {
        "schedule.name": "linear",
        "schedule.zero_terminal_snr": True,
        "objective.prediction": "v",
        "sampler.spacing": "trailing",
    },
}
# Issue 20's candidates for a faster main job: the main job's own UNet on the cosine
# schedule in 800 steps instead of 1,200, and the digits UNet at 32 base channels (0.70M
# parameters, 8 norm groups) on the cosine schedule, at the main job's learning rate and at
# 5e-4, with and without dropout, and at 5e-4 for 2,000 steps (the 800-step run's time).
# In run order: the seed-0 results put the 5e-4 arms ahead.
_SMALL = {"schedule.name": "cosine", "model.unet.norm_groups": 8, "model.unet.base_channels": 32}
MAIN_JOB_ARMS = {
    "ch32_lr5e-4_2000steps": {**_SMALL, "optim.learning_rate": 5e-4, "train.num_steps": 2000},
    "ch32_lr5e-4_drop0": {**_SMALL, "optim.learning_rate": 5e-4, "model.unet.dropout": 0.0},
    "ch32_lr5e-4": {**_SMALL, "optim.learning_rate": 5e-4},
    "ch64_800steps": {"schedule.name": "cosine", "train.num_steps": 800},
    "ch32": dict(_SMALL),
}
# Each arm samples with its own spacing (DDIM) and with log-SNR spacing (DPM-Solver++).
ARM_EVALS = tuple(
    {"sampler": "ddim", "num_steps": n, "eta": eta} for eta in (0.0, 1.0) for n in (10, 20, 50)
) + tuple({"sampler": "dpmpp_2m", "num_steps": n, "spacing": "logsnr"} for n in (10, 20))
# The digits records above predate sampler.lambda_min: their log-SNR grids span the whole
# range (lambda_min = -inf), which clip_x0 made harmless on pixels. On Fashion's latents
# (no clipping) the cosine and sigmoid arms failed that way (FID 100-119x the floor, seed 0),
# so its DPM-Solver++ evaluations name the clipped start, the default -5.1.
FASHION_ARM_EVALS = ARM_EVALS[:-2] + tuple({**spec, "lambda_min": -5.1} for spec in ARM_EVALS[-2:])
# On the first training seed only: 1,000 steps (at N = 500 they still cost ~3x the rest
# together); DDIM-50 at four more sampling seeds, which checks the bootstrap interval
# against the spread it predicts; DDIM-50 at N = 300 and 500, what N buys.
ARM_EVALS_SEED0 = (
    tuple(
        {"sampler": "ddim", "num_steps": 1000, "eta": eta, "num_samples": 500} for eta in (0.0, 1.0)
    )
    + tuple({"sampler": "ddim", "num_steps": 50, "eta": 0.0, "seed": s} for s in (1, 2, 3, 4))
    + tuple({"sampler": "ddim", "num_steps": 50, "eta": 0.0, "num_samples": n} for n in (300, 500))
)


def _arms_sweep(
    name: str,
    config: str,
    *,
    budget: str,
    fixed=None,
    evals=ARM_EVALS,
    limited_evals=(),
    prepare=(),
) -> Sweep:
    """The schedule arms x three training seeds on ``config``, scored at N = 1000."""
    return Sweep(
        name=name,
        config=config,
        axes={"seed": (0, 1, 2), ARM_AXIS: tuple(SCHEDULE_ARMS)},
        arms=SCHEDULE_ARMS,
        fixed={"train.quiet": True, **(fixed or {})},
        evals=evals,
        limited_evals=limited_evals,
        eval_samples=1000,
        budget=budget,
        prepare=prepare,
    )


SWEEPS = {
    "schedule_ablation": Sweep(
        name="schedule_ablation",
        config="configs/digits_unet.py",
        axes={"schedule.name": ("linear", "cosine"), "seed": (0, 1)},
        fixed={
            "train.quiet": True,
            "eval.every_steps": 400,
            "eval.metrics_every_steps": 400,
            "eval.metrics_num_samples": 300,
        },
        evals=STEPS_AXIS,
        eval_samples=300,
        budget=(
            "4 runs x (~10 min training incl. in-loop FID + ~9 min evaluation) on the "
            "2-core Intel Xeon dev box: ~80 min in total (~2.5x that on a 2-core AMD "
            "EPYC guest)"
        ),
    ),
    # Issue 24: the class-conditional DiT against the UNet at equal training time, each
    # with its own config; quality is measured in the loop (the clock excludes it).
    "dit_vs_unet": Sweep(
        name="dit_vs_unet",
        config="configs/digits_dit.py",
        axes={"config": ("configs/digits_unet_cond.py", "configs/digits_dit.py"), "seed": (0,)},
        fixed={
            "train.quiet": True,
            "eval.metrics_every_steps": 200,
            "eval.metrics_num_samples": 500,
        },
        # guidance 1, 2, 3 and 1.5 at sampling seed 0, and guidance 2 (the configs' scale)
        # at four more seeds: FID at N = 500 moves with the sampling seed.
        evals=tuple(
            dict(sampler="ddim", num_steps=50, guidance_scale=g, seed=seed)
            for g, seed in [(1.0, 0), (2.0, 0), (3.0, 0), (1.5, 0)]
            + [(2.0, s) for s in (1, 2, 3, 4)]
        ),
        eval_samples=500,
        budget=(
            "2 runs on a 2-core AMD EPYC guest: training 10.7 min (UNet, 1,200 steps) and "
            "14.9 min (DiT, 2,400 steps) on their own clocks, plus in-loop metrics (~46 s "
            "each, 6 + 12) and 8 evaluations per run (~1 min each): ~70 min in total"
        ),
    ),
    # Issue 22: the schedule arms the field compares, three training seeds, intervals.
    "schedule_arms": _arms_sweep(
        "schedule_arms",
        "configs/digits_unet.py",
        fixed={
            "eval.every_steps": 400,
            "eval.metrics_every_steps": 400,
            "eval.metrics_num_samples": 300,
        },
        limited_evals=tuple(({"seed": 0}, spec) for spec in ARM_EVALS_SEED0),
        budget=(
            "12 runs (4 arms x 3 training seeds) of the README main job's config "
            "(1,200 steps at batch 128), each 8-10 min of training alone on a 2-core Intel "
            "Xeon guest (2.0-2.2 steps/s; ~14 min on a 2-core AMD EPYC guest), then 8 "
            "evaluations at N = 1000 (~3 min); on seed 0 also DDIM-1000 at eta 0 and 1 at "
            "N = 500 (~5 min each) and 6 more DDIM-50 evaluations (17-18 min per arm in "
            "all); measured, ~6 CPU hours for the sweep"
        ),
    ),
    # Issue 22 on a real 28x28 dataset: the same arms for the class-conditional latent DiT
    # on Fashion-MNIST, on the latents of runs/fashion_ae (made first: see the config).
    "schedule_arms_fashion": _arms_sweep(
        "schedule_arms_fashion",
        "configs/fashion_ldm.py",
        evals=FASHION_ARM_EVALS,
        limited_evals=tuple(({"seed": 0}, spec) for spec in ARM_EVALS_SEED0),
        prepare=(
            (
                "runs/fashion_ae",
                (
                    "diffusion_jax.main",
                    "--config=configs/fashion_autoencoder.py",
                    "--workdir=runs/fashion_ae",
                ),
            ),
            (
                "runs/fashion_latents",
                (
                    "diffusion_jax.encode",
                    "--autoencoder=runs/fashion_ae",
                    "--out=runs/fashion_latents",
                ),
            ),
        ),
        budget=(
            "12 runs (4 arms x 3 training seeds) of configs/fashion_ldm.py (2,000 steps at "
            "batch 128), measured on 2-core AMD EPYC and Intel Xeon guests: 1.4-3.1 steps/s, "
            "11-13 min of training per run (24 min when sharing the cores), then 8 guided "
            "evaluations at N = 1000 (1-3 min each); on seed 0 also DDIM-1000 at eta 0 and 1 "
            "at N = 500 (~24 min each beside a second evaluation) and 6 more DDIM-50 "
            "evaluations (sampling seeds, N)"
        ),
    ),
    # Issue 20: a main job that ends in <= 10 min on the 2-core CI guest, install included,
    # with the quality of today's. Shorter or smaller runs on the cosine schedule (which
    # reached the 2.8M UNet's step-1200 FID by step 800 in schedule_arms), FID every 200
    # steps; each arm's wall time is its step count times its quiet step time.
    "main_job_budget": Sweep(
        name="main_job_budget",
        config="configs/digits_unet.py",
        axes={"seed": (0, 1), ARM_AXIS: tuple(MAIN_JOB_ARMS)},
        arms=MAIN_JOB_ARMS,
        fixed={
            "train.quiet": True,
            "eval.every_steps": 400,
            "eval.metrics_every_steps": 200,
            "eval.metrics_num_samples": 300,
        },
        budget=(
            "10 runs (5 arms x 2 training seeds) at batch 128: the 2.8M UNet for 800 steps "
            "(~6 min of training alone on a 2-core AMD EPYC guest), the 0.70M UNet for "
            "1,200 steps (~3.6 min) or 2,000 (~6 min); plus an in-loop FID at N = 300 "
            "every 200 steps"
        ),
    ),
    # A seconds-long sweep for the launcher's own tests.
    "smoke": Sweep(
        name="smoke",
        config="configs/tiny.py",
        axes={"schedule.name": ("linear", "cosine")},
        fixed={"train.num_steps": 4, "ckpt.every_steps": 4},
        evals=({"sampler": "ddim", "num_steps": 3},),
        eval_samples=16,
        budget="seconds",
    ),
}
