"""The training data order: steps per epoch, the per-epoch order of sequences, the loader."""

from __future__ import annotations

import numpy as np
import torch

from kd.cache import CacheSplit
from kd.errors import KDError


def steps_per_epoch(num_sequences: int, world: int, micro_batch_size: int, accumulation: int) -> int:
    """Optimizer steps in one pass over the train split (a remainder smaller than one window is dropped)."""
    return (num_sequences // world) // (micro_batch_size * accumulation)


def epoch_order(
    num_sequences: int,
    epoch: int,
    seed: int,
    rank: int,
    world: int,
    per_step: int,
    shard_starts: np.ndarray | None = None,
    buffer_shards: int = 0,
) -> np.ndarray:
    """This process's sequence indices for `epoch`, in order: a seeded order of all sequences dealt round-robin to
    ranks (so ranks never share a sequence), cut to whole optimizer windows. A pure function of (epoch, seed), so a
    resumed run sees the same data.

    exact (`shard_starts` None): a uniform permutation; every read may hit another shard.
    shard-aware (`shard_starts` = first sequence of each shard, `buffer_shards` = B >= 1): the shards in a seeded
    order, then the sequences of each run of B consecutive shards of that order permuted together (as
    mosaicml/streaming's shuffle blocks). Each process reads from B shards at a time, mostly sequentially within a
    file; two sequences of one shard can only be placed within B shards' worth of each other, a bias that vanishes
    as B grows (B = all shards is the exact shuffle)."""
    rng = np.random.default_rng([seed, epoch])
    if shard_starts is None:
        perm = rng.permutation(num_sequences)
    else:
        bounds = np.append(np.asarray(shard_starts, dtype=np.int64), num_sequences)
        shard_order = rng.permutation(len(bounds) - 1)
        B = max(1, buffer_shards)
        perm = np.concatenate(
            [
                rng.permutation(np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in shard_order[g : g + B]]))
                for g in range(0, len(shard_order), B)
            ]
        )
    mine = perm[rank::world][: num_sequences // world]
    return mine[: (len(mine) // per_step) * per_step]


def make_loader(split: CacheSplit, indices, batch_size: int, num_workers: int, pin_memory: bool):
    return _CleanErrors(
        torch.utils.data.DataLoader(
            torch.utils.data.Subset(split, list(map(int, indices))),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
    )


class _CleanErrors:
    """A DataLoader whose KDErrors (a damaged shard, a cache changed under the reader) keep their one-line message:
    raised in a worker process, the DataLoader re-raises them with the worker's traceback folded into the text."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        try:
            yield from self.loader
        except KDError as e:
            msg = str(e)
            if "Original Traceback" in msg:
                msg = msg.rstrip().rsplit("KDError: ", 1)[-1]
            raise KDError(msg) from None
