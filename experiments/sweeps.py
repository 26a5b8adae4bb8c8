"""Sweep definitions: a base config, axes of dotted overrides (their product is the set of
runs) and the evaluations to run on each trained workdir.

A run is named by its axis values, e.g. ``schedule.name=cosine,seed=1``; its workdir is
``<root>/<sweep>/<run name>``. The axis ``config`` picks the config file itself (runs
named by its stem, e.g. ``config=digits_dit``).
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
    evals: tuple[dict[str, Any], ...] = ()
    eval_samples: int = 1000  # samples per evaluation (FID is biased by N: keep it fixed)
    budget: str = ""  # the CPU budget the sweep was sized for (reported)

    def runs(self) -> list[dict[str, Any]]:
        """One dict of overrides (axes + fixed) per run, in a stable order."""
        keys = list(self.axes)
        return [
            dict(zip(keys, values), **self.fixed)
            for values in itertools.product(*(self.axes[k] for k in keys))
        ]

    def config_of(self, overrides: dict[str, Any]) -> str:
        """The run's config file: the ``config`` axis when the sweep has one (e.g. two
        architectures, each with its own tuned config), else ``self.config``."""
        return overrides.get(CONFIG_AXIS, self.config)

    def run_name(self, overrides: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
        """``key=value,...`` over the axes (but ``skip``: e.g. the seed, for group names)."""
        return ",".join(f"{k}={_value_name(k, overrides[k])}" for k in self.axes if k not in skip)


# The axis key that picks the config file instead of overriding a config key.
CONFIG_AXIS = "config"


def _value_name(key: str, value: Any) -> str:
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
