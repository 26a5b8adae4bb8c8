"""Cost of the optimizer update and of its non-finite guard, on a real config's state.

    .venv/bin/python benchmarks/bench_update.py                    # DDPM CIFAR-10, ~1 min
    .venv/bin/python benchmarks/bench_update.py --config digits_unet --repeats 20

Times three jitted functions of (state, grads) -> state, each with the state donated as
in the real step (so the update runs in place):

- ``none``:  steps.apply_gradients (AdamW from state.make_optimizer, then the EMA);
- ``cond``:  steps.skip_if_not_finite around it, as steps.make_train_step does;
- ``where``: the alternative, a ``jnp.where(finite, new, old)`` over every state leaf.

``finite`` is computed from the gradients inside each function, so nothing is constant-
folded; the gradients are finite, so both guards apply the update. Interleaved rounds,
median of each; the spread across rounds is printed since a shared machine drifts.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import SHAPES, get_config  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)


def make_update(kind: str, tx, optim_cfg):
    import jax
    import jax.numpy as jnp
    import optax

    from diffusion_jax import steps

    def update(state, grads):
        finite = jnp.isfinite(optax.tree.norm(grads))
        apply = lambda s: steps.apply_gradients(s, grads, tx, optim_cfg)
        if kind == "none":
            return apply(state)
        if kind == "cond":
            return steps.skip_if_not_finite(finite, apply, state)
        new = apply(state)
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)

    return jax.jit(update, donate_argnums=0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10_ddpm", choices=sorted(SHAPES))
    p.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant")
    args = p.parse_args()

    import jax

    from diffusion_jax.models import build_model, count_params
    from diffusion_jax.state import create_train_state, make_optimizer

    cfg = get_config(args.config)
    model = build_model(cfg.model)
    tx = make_optimizer(cfg.optim, cfg.train.num_steps)
    state = create_train_state(model, tx, SHAPES[args.config], cfg.seed)
    grads = jax.tree.map(lambda x: 1e-3 * x, state.params)
    print(common.describe_machine())
    print(
        f"{args.config}: {count_params(state.params):,} params; state donated; "
        f"{args.rounds} rounds x {args.repeats} calls"
    )

    kinds = ("none", "cond", "where")
    fns = {k: make_update(k, tx, cfg.optim) for k in kinds}
    states = {k: jax.tree.map(lambda x: x.copy(), state) for k in kinds}
    medians = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:

            def call(k=k):
                states[k] = fns[k](states[k], grads)
                return states[k]

            times = common.time_calls(call, args.repeats, warmup=1, block=jax.block_until_ready)
            medians[k].append(1e3 * common.median(times))
    base = float(np.median(medians["none"]))
    rows = [
        [
            k,
            f"{np.median(medians[k]):.1f}",
            f"{min(medians[k]):.1f}-{max(medians[k]):.1f}",
            f"{np.median(medians[k]) - base:+.1f}",
        ]
        for k in kinds
    ]
    print(common.format_table(["guard", "ms (median of rounds)", "round medians", "vs none"], rows))


if __name__ == "__main__":
    main()
