"""Sweep definitions: a base config, axes of dotted overrides (their product is the set of
runs) and the evaluations to run on each trained workdir.

A run is named by its axis values, e.g. ``schedule.name=cosine,seed=1``; its workdir is
``<root>/<sweep>/<run name>``.
"""

from __future__ import annotations

import dataclasses
import itertools
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

    def run_name(self, overrides: dict[str, Any]) -> str:
        return ",".join(f"{k}={overrides[k]}" for k in self.axes)


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
