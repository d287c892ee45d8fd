"""The data order: which examples each process trains on at each optimizer step.

The order is a pure function of (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run would have, without saving any data-loader state.
"""

from __future__ import annotations

import torch


class StepSampler:
    """Micro-batches for optimizer step `step` (1-based) of one process of `world`.

    One global batch is micro x accumulation x world examples; within it, accumulation step k of
    process `rank` takes the k-th block of `world` micro-batches, the rank-th of them.
    """

    def __init__(self, examples: list[dict], seed: int, micro_batch_size: int, accumulation: int,
                 world: int = 1, rank: int = 0, group_by_length: bool = False):
        self.examples, self.seed, self.group_by_length = examples, seed, group_by_length
        self.micro, self.accumulation, self.world, self.rank = micro_batch_size, accumulation, world, rank
        self.global_batch = micro_batch_size * accumulation * world
        self.steps_per_epoch = len(examples) // self.global_batch
        self._order: tuple[int, list[int]] | None = None  # (epoch, order): one epoch at a time

    def batches(self, step: int) -> list[list[dict]]:
        epoch, index = divmod(step - 1, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = index * self.global_batch
        return [[self.examples[j] for j in order[lo : lo + self.micro]]
                for lo in (start + (k * self.world + self.rank) * self.micro for k in range(self.accumulation))]

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's example order: a seeded permutation; with group_by_length, each window of 16 global
        batches of it is sorted by length and its global batches shuffled (same generator), so a
        micro-batch holds examples of similar length (little padding) while steps still vary at random."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        if self.group_by_length:
            window, grouped, gb = 16 * self.global_batch, [], self.global_batch
            for w in range(0, len(order), window):
                chunk = sorted(order[w : w + window], key=lambda j: len(self.examples[j]["input_ids"]), reverse=True)
                blocks = [chunk[i : i + gb] for i in range(0, len(chunk), gb)]
                # A short last block (end of the data) stays last: steps take whole global batches from the front.
                full = [b for b in blocks if len(b) == gb]
                grouped += [j for b in torch.randperm(len(full), generator=g).tolist() for j in full[b]]
                grouped += [j for b in blocks if len(b) < gb for j in b]
            order = grouped
        self._order = (epoch, order)
        return order
