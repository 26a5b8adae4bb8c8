"""A sweep's finished runs, kept in the repository: ``<records>/<sweep>/records/<run name>/``
holds a copy of the run's metrics.jsonl (training log), eval.jsonl (in-loop and
evaluate.py records) and config.json (what it was trained with), written once the run is
trained and every evaluation the sweep asks of it is recorded.

A sweep costs hours of CPU, more than one working session, and run workdirs (checkpoints
included) do not outlive the machine they were made on. The records are what the report
needs and they are small (a few kB per run): committed, they let a sweep go on on another
machine (experiments.run skips archived runs) and let the report be rebuilt from results
alone. A run is archived whole or not at all, so its records always come from one
training; if the sweep later gains an evaluation, an archived run without its workdir is
retrained and evaluated afresh, and its archive replaced; so is a run whose archived
config differs from the one the sweep gives it now (a stale archive).
"""

from __future__ import annotations

import json
import os
import shutil

from diffusion_jax.workdir import CONFIG_FILE, flatten

# What a run's archive holds: the files experiments.results reads, and the config the run
# was trained with (an archive made with another config than the sweep's is stale).
FILES = ("metrics.jsonl", "eval.jsonl", CONFIG_FILE)


def archive_of(sweep, overrides: dict, records: str) -> str:
    return os.path.join(records, sweep.name, "records", sweep.run_name(overrides))


def is_archived(sweep, overrides: dict, records: str | None) -> bool:
    return bool(records) and os.path.exists(
        os.path.join(archive_of(sweep, overrides, records), "eval.jsonl")
    )


def stale_keys(config, dest: str) -> list[str]:
    """The keys whose value in the archive's config.json differs from ``config`` (the
    config the sweep would train the run with now); keys one side lacks are not compared
    (a key added to configs/base.py later keeps its default). An archive without a
    config.json is stale as a whole: ``["config.json"]``."""
    path = os.path.join(dest, CONFIG_FILE)
    if not os.path.exists(path):
        return [CONFIG_FILE]
    with open(path) as f:
        old = flatten(json.load(f))
    new = flatten(json.loads(config.to_json_best_effort()))
    return [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def save(wd: str, dest: str) -> bool:
    """Copy a finished run's records from its workdir ``wd`` to its archive ``dest``,
    whole or not at all; False (nothing written) when the archive already holds them."""
    if _up_to_date(wd, dest):
        return False
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in FILES:
        if os.path.exists(os.path.join(wd, name)):
            shutil.copy2(os.path.join(wd, name), os.path.join(tmp, name))
    latents_metadata = _latents_metadata(wd)
    if latents_metadata:
        shutil.copy2(latents_metadata, os.path.join(tmp, os.path.basename(latents_metadata)))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return True


def _latents_metadata(wd: str) -> str | None:
    """The metadata file of the latent dataset the run in ``wd`` trained on, if it did
    (the autoencoder and its step, the measured scale_factor). It is archived with the
    run: an autoencoder is remade on each machine, and this says which one a run used."""
    path = os.path.join(wd, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f).get("data", {})
    if data.get("name") != "latents":
        return None
    from diffusion_jax.datasets import latents  # imports tensorflow_datasets: only here

    meta = latents.metadata_path(os.path.expanduser(data.get("data_dir", "")))
    return meta if os.path.exists(meta) else None


def _up_to_date(wd: str, dest: str) -> bool:
    def read(d, name):
        path = os.path.join(d, name)
        return open(path, "rb").read() if os.path.exists(path) else None

    return os.path.isdir(dest) and all(read(wd, n) == read(dest, n) for n in FILES)
