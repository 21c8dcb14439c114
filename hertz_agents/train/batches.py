"""Training batches in an order that resumes exactly, and which validation items to score.

Each epoch is a permutation of the dataset that depends only on ``(seed, epoch)``, cut into equal
shards (one per rank) and then into batches, so a resumed run skips straight to where it
stopped without loading what it skips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from hertz_agents.train.config import RecipeError
from hertz_agents.train.runtime import Runtime


class BatchStream:
    """Endless training batches whose order is a pure function of ``(seed, epoch)``.

    Each epoch is a permutation of the dataset, cut into equal shards (one per rank) and then
    into batches; a trailing partial batch is dropped. The position is (epoch, batches taken),
    so a resumed run skips straight to where it stopped without loading what it skips.

    Args:
        make_dataset: Builds the dataset; called again each epoch when ``rescan`` is set.
        batch_size: Items per batch on this rank.
        rt: The process's place in the run.
        seed: Data-order seed.
        workers: DataLoader worker processes.
        rescan: Rebuild the dataset at each epoch (for a corpus that is still growing).
    """

    def __init__(
        self,
        make_dataset: Callable[[], Dataset[Tensor]],
        batch_size: int,
        rt: Runtime,
        seed: int,
        workers: int = 0,
        rescan: bool = False,
    ) -> None:
        self.make_dataset, self.batch_size, self.rt = make_dataset, batch_size, rt
        self.seed, self.workers, self.rescan = seed, workers, rescan
        self.dataset = make_dataset()
        self.epoch, self.taken = 0, 0

    def batches_of(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of item indices) of ``epoch``, in a seeded shuffled order."""
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        per_rank = n // self.rt.world
        shard = order[self.rt.rank * per_rank : (self.rt.rank + 1) * per_rank].tolist()
        b = self.batch_size
        return [shard[i * b : (i + 1) * b] for i in range(len(shard) // b)]

    def __iter__(self) -> Iterator[Tensor]:
        empty_epochs = 0
        while True:
            batches = self.batches_of(self.epoch)
            if not batches:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RecipeError(too_few_items(self.dataset, self.batch_size, self.rt.world))
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            # Its own generator: making the iterator must not draw from the global RNG, which a
            # resumed run restores at a different point than the uninterrupted run draws it.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7)
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches[self.taken :],
                num_workers=self.workers,
                generator=g,
            )
            for batch in loader:
                self.taken += 1
                yield batch
            self.epoch, self.taken = self.epoch + 1, 0
            if self.rescan:
                self.dataset = self.make_dataset()

    def state_dict(self) -> dict[str, int]:
        """The position in the stream (epoch, batches taken), for a checkpoint."""
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        self.epoch, self.taken = state["epoch"], state["taken"]


def too_few_items(dataset: Any, batch_size: int, world: int) -> str:
    """Why there is not one batch, and what to change: short files point at the segment length."""
    n = len(dataset)
    skipped = getattr(dataset, "skipped", [])
    short = [p for p, why in skipped if why.startswith("shorter than one segment")]
    if short:
        seconds = getattr(dataset, "segment", 0) / max(1, getattr(dataset, "sample_rate", 1))
        return (
            f"{len(short)} of {len(short) + len(getattr(dataset, 'files', []))} files are shorter "
            f"than data.segment_seconds ({seconds:g} s), leaving {n} segments: lower "
            "data.segment_seconds (e.g. 4) or add longer recordings"
        )
    return (
        f"the training set has {n} items, fewer than one batch of {batch_size} on each of "
        f"{world} process(es): add data or lower optim.batch_size"
    )


def validation_indices(n: int, items: int, rt: Runtime) -> list[int]:
    """``items`` indices spread evenly over ``n``, this rank's share of them."""
    count = min(n, items)
    chosen = sorted({int(i * n / count) for i in range(count)}) if count else []
    return chosen[rt.rank :: rt.world]
