"""The order of training examples, as two index-remapping grain datasets.

``EpochShuffle`` gives each epoch its own permutation of the split; ``ProcessRows`` cuts the
shuffled stream into global batches and keeps this process's rows of each. Together they
make the stream depend only on (dataset, split, seed, global batch size), never on the
process layout (see data.py's docstring). Both define only grain's public MapDataset
interface (``__len__``, ``__getitem__``); batching reads elements one index at a time.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


class EpochShuffle(grain.MapDataset):
    """Index ``e * n + j`` -> parent index ``e * n + perm_e[j]``: a fresh permutation per epoch.

    ``perm_e = default_rng([seed, e]).permutation(n)``, materialised once per epoch (8 bytes
    per example, ~75 ms for ImageNet's 1.28M) and cached; lookups are then O(1). (grain's
    ``shuffle`` computes each index on the fly but costs ~18 us per element on small
    datasets, and seeds epoch ``e`` with ``seed + e``, so seed 1 would replay seed 0's
    epochs shifted by one.)
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._n = len(parent)
        self._seed = seed
        self._cache = (None, None)  # (epoch, permutation); replaced atomically

    def __len__(self) -> int:
        return self._n

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getstate__(self):  # pickled into grain workers: send no cached permutation
        state = self.__dict__.copy()
        state["_cache"] = (None, None)
        return state

    def _permutation(self, epoch: int) -> np.ndarray:
        cached_epoch, permutation = self._cache
        if cached_epoch != epoch:
            permutation = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._cache = (epoch, permutation)
        return permutation

    def _parent_index(self, index: int) -> int:
        epoch, position = divmod(index, self._n)
        return epoch * self._n + int(self._permutation(epoch)[position])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]


class ProcessRows(grain.MapDataset):
    """This process's rows of the global batches, as a flat infinite dataset.

    Element ``k`` is row ``process_index * b + k % b`` of global step ``k // b``. Global
    step ``s`` of epoch ``e = s // steps_per_epoch`` covers positions
    ``[(s % steps_per_epoch) * G, ... + G)`` of the epoch's permutation, i.e. parent index
    ``e * n + position`` (the shuffled parent reshuffles per ``index // n``). The
    ``n - steps_per_epoch * G`` positions left at the end of each epoch are dropped. Only
    the selected parent elements are ever read.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        num_examples: int,
        batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(parent)
        self._n = num_examples
        self._b = batch_size
        self._global_batch = batch_size * process_count
        self._row0 = process_index * batch_size
        self._steps_per_epoch = num_examples // self._global_batch

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"ProcessRows(b={self._b}, G={self._global_batch}, row0={self._row0})"

    def _parent_index(self, k: int) -> int:
        step, row = divmod(k, self._b)
        epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
        return epoch * self._n + step_in_epoch * self._global_batch + self._row0 + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]
