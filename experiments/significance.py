"""The report's tables with uncertainty: per arm, the mean over training seeds with its 95%
t-interval; paired comparisons between arms (same training seeds, sampling seeds and
reference subsets) with significance marks; how wide the within-run bootstrap interval is,
how it narrows with the sample size N, and whether it predicts the spread over sampling
seeds. Intervals come from ``diffusion_jax.evaluation.intervals``."""

from __future__ import annotations

import itertools

import numpy as np

from diffusion_jax.evaluation import intervals
from experiments.results import eval_by_seed, eval_record, spec_label


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def interval_cell(values, digits: int = 3) -> str:
    """'mean [low, high]' (95% t-interval over seeds), the bare value for one seed, '—'
    for none."""
    iv = intervals.t_interval(values)
    if iv is None:
        return "—"
    if iv.n == 1:
        return _num(iv.mean, digits)
    return f"{_num(iv.mean, digits)} [{_num(iv.low, digits)}, {_num(iv.high, digits)}]"


def _header(first: str, columns) -> list[str]:
    return [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]


def metric_table(groups, specs, key: str, digits: int = 3) -> list[str]:
    """Rows: evaluation specs; columns: arms (n = runs with a value); cells: mean over
    training seeds and its 95% t-interval."""
    counts = {
        g: max((len(eval_by_seed(runs, s, key)) for s in specs), default=0)
        for g, runs in groups.items()
    }
    lines = _header("sampler", [f"{g} (n={counts[g]})" for g in groups])
    for spec in specs:
        cells = [
            interval_cell(eval_by_seed(runs, spec, key).values(), digits)
            for runs in groups.values()
        ]
        lines.append(f"| {spec_label(spec)} | " + " | ".join(cells) + " |")
    return lines + [""]


def comparison_cell(cmp: intervals.Comparison | None, base_mean: float) -> str:
    """'-12% [-20, -4] *': the mean paired difference relative to the baseline arm's mean,
    its 95% interval (same scale) and '*' when the interval excludes 0 ('n.s.' else)."""
    if cmp is None:
        return "—"
    d = cmp.difference
    pct = 100.0 / base_mean
    mark = "*" if cmp.significant else "n.s."
    return f"{d.mean * pct:+.0f}% [{d.low * pct:+.0f}, {d.high * pct:+.0f}] {mark}"


def _paired(groups, a: str, b: str, spec: dict, key: str):
    """(the paired comparison of b against a over their common training seeds, a's mean
    over those seeds); (None, 1) without a common seed."""
    va, vb = eval_by_seed(groups[a], spec, key), eval_by_seed(groups[b], spec, key)
    seeds = sorted(set(va) & set(vb))
    cmp = intervals.paired_difference([vb[s] for s in seeds], [va[s] for s in seeds])
    return cmp, (np.mean([va[s] for s in seeds]) if seeds else 1)


def comparison_table(groups, specs, key: str) -> list[str]:
    """Every pair of arms (b vs a, a listed first), paired by training seed: the
    difference b - a of ``key`` relative to a's mean. Negative = b scores lower."""
    pairs = list(itertools.combinations(groups, 2))
    lines = _header("sampler", [f"{b} vs {a}" for a, b in pairs])
    for spec in specs:
        cells = [comparison_cell(*_paired(groups, a, b, spec, key)) for a, b in pairs]
        lines.append(f"| {spec_label(spec)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _shared_seeds(by_arm: dict[str, dict]) -> tuple[list[int], list[str]]:
    """(the training seeds every arm with two or more seeds has, the other arms): one seed
    set on which to rank and compare the arms, so that a sweep still in progress, whose
    arms have finished different seeds, cannot rank an arm on seeds the others lack."""
    tested = [g for g, v in by_arm.items() if len(v) >= 2]
    seeds = set.intersection(*(set(by_arm[g]) for g in tested)) if tested else set()
    return sorted(seeds), [g for g in by_arm if g not in tested]


def best_arm_table(groups, specs, key: str) -> list[str]:
    """Per sampler, the answer a reader wants first: the arm with the lowest mean ``key``,
    the arms it beats significantly (paired, 95%), and those it cannot be told from. Arms
    are ranked and compared on the training seeds they all share (``_shared_seeds``);
    an arm with fewer than two seeds, or every arm but the best when fewer than two seeds
    are shared, is listed apart, as untested."""
    lines = _header(
        "sampler", ["best (mean)", "significantly worse", "not distinguishable", "untested"]
    )
    for spec in specs:
        by_arm = {g: v for g, runs in groups.items() if (v := eval_by_seed(runs, spec, key))}
        if not by_arm:
            continue
        seeds, untested = _shared_seeds(by_arm)
        paired = len(seeds) >= 2  # else nothing to compare on: rank on each arm's own seeds
        means = {
            g: np.mean([v[s] for s in seeds] if paired else list(v.values()))
            for g, v in by_arm.items()
            if not (paired and g in untested)
        }
        best = min(means, key=means.get)
        worse, same = [], []
        if not paired:
            untested = [g for g in by_arm if g != best]
        for g in (g for g in means if paired and g != best):
            cmp = intervals.paired_difference(
                [by_arm[g][s] for s in seeds], [by_arm[best][s] for s in seeds]
            )
            (untested if cmp is None else worse if cmp.significant else same).append(g)
        cells = [", ".join(arms) or "—" for arms in (worse, same, untested)]
        lines.append(
            f"| {spec_label(spec)} | {best} ({means[best]:.3f}) | " + " | ".join(cells) + " |"
        )
    return lines + [""]


def _relative_half_width(record: dict | None) -> float | None:
    """A record's bootstrap 95% half-width over its matched FID (None without one)."""
    if record is None or "fid_matched_high" not in record:
        return None
    return (record["fid_matched_high"] - record["fid_matched_low"]) / 2 / record["fid_matched"]


def _pct(values) -> str:
    values = [v for v in values if v is not None]
    return f"±{100 * np.mean(values):.0f}%" if values else "—"


def noise_table(groups, specs) -> list[str]:
    """Per sampler: the 95% half-width of matched FID from the within-run bootstrap
    (sampling noise alone, mean over runs) next to the half-width of the t-interval over
    training seeds (training + sampling noise, mean over arms), both relative to the
    mean FID."""
    lines = _header("sampler", ["bootstrap over samples (one run)", "t over training seeds"])
    for spec in specs:
        boot = [_relative_half_width(eval_record(r, spec)) for rs in groups.values() for r in rs]
        seeds = []
        for runs in groups.values():
            iv = intervals.t_interval(eval_by_seed(runs, spec, "fid_matched").values())
            if iv is not None and iv.n > 1:
                seeds.append(iv.half_width / iv.mean)
        lines.append(f"| {spec_label(spec)} | {_pct(boot)} | {_pct(seeds)} |")
    return lines + [""]


def _without(spec: dict, key: str) -> dict:
    return {k: v for k, v in spec.items() if k != key}


def sample_size_table(groups, sweep) -> list[str]:
    """What N buys: the evaluations that repeat one of the sweep's evals at another
    "num_samples" (first training seed), with it at ``eval_samples``: matched FID ± its
    bootstrap 95% half-width at each N, per arm."""
    sized = [
        s
        for s in sweep.all_evals()
        if "num_samples" in s and "seed" not in s and _without(s, "num_samples") in sweep.evals
    ]
    if not sized:
        return []
    base = _without(sized[0], "num_samples")
    specs = [s for s in sized if _without(s, "num_samples") == base] + [base]
    lines = _header("N (matched N)", list(groups))
    for spec in sorted(specs, key=sweep.samples_of):
        cells, matched = [], "—"
        for runs in groups.values():
            r = eval_record(runs[0], spec)
            rel = _relative_half_width(r)
            if rel is None:
                cells.append("—")
                continue
            matched = r.get("matched_num_samples", matched)
            cells.append(
                f"{r['fid_matched']:.3f} ± {rel * r['fid_matched']:.3f} ({100 * rel:.0f}%)"
            )
        lines.append(f"| {sweep.samples_of(spec)} ({matched}) | " + " | ".join(cells) + " |")
    return lines + [""]


def sampling_seed_table(groups, sweep) -> list[str]:
    """For the evaluation repeated over sampling seeds (limited evals with a "seed", all
    one flag set but the seed), per run: the spread (std) of matched FID over the seeds next to the bootstrap's prediction
    of it (half-width / 1.96, mean over the same records)."""
    repeated = [s for _, s in sweep.limited_evals if "seed" in s]
    if not repeated:
        return []
    base = {k: v for k, v in repeated[0].items() if k != "seed"}
    seeds = [0] + [s["seed"] for s in repeated]
    lines = _header("arm", ["sampling seeds", "FID mean", "std over seeds", "bootstrap std"])
    for g, runs in groups.items():
        for run in runs:
            recs = [eval_record(run, {**base, "seed": s}) for s in seeds]
            recs = [r for r in recs if r is not None and "fid_matched_high" in r]
            if len(recs) < 2:
                continue
            fids = [r["fid_matched"] for r in recs]
            boot = np.mean([(r["fid_matched_high"] - r["fid_matched_low"]) / 2 for r in recs])
            lines.append(
                f"| {g} | {len(recs)} | {np.mean(fids):.3f} | {np.std(fids, ddof=1):.3f} "
                f"| {boot / 1.96:.3f} |"
            )
    return lines + [""]
