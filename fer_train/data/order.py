"""Which samples each rank reads, batch by batch, in each epoch: shared by the DALI and the PyTorch
pipelines so both read the same samples in the same order and a resumed run continues where it left."""

from __future__ import annotations

import torch


class EpochOrder:
    """Training: a permutation of the data set drawn from (seed, epoch), cut into batches dealt to the ranks
    in turn (batch q of rank r is batch q * world + r of the permutation), so no sample is read twice in
    an epoch and `world` processes read the micro-batches one process reads with `world`-fold gradient
    accumulation: DDP gives the same steps. Training drops the tail that would not fill a batch on every
    rank (each rank gets the same number of full batches, as DDP needs). Evaluation: the data set in order,
    dealt sample by sample; everything is read, the last batch may be short and ranks may differ by one
    batch.

    weights (training only): each sample's chance of being drawn, up to a constant (class-balanced sampling,
    sample_weights). The epoch is then as many draws with replacement as the permutation would deal, from
    the same (seed, epoch) generator: a rare class's samples repeat within an epoch, a common class's are
    partly left out. repeats() numbers each sample's draws within the epoch, so that the augmentation draws
    anew for every repeat rather than showing the model the same image again."""

    def __init__(self, size: int, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 weights: torch.Tensor | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if train and size < batch_size * world:
            raise ValueError(f"the training set has {size} samples, fewer than one batch of {batch_size} on each of "
                             f"{world} ranks")
        if weights is not None and (weights.shape != (size,) or not bool(torch.all(weights >= 0))
                                    or not float(weights.sum()) > 0):
            raise ValueError(f"weights must be {size} non-negative numbers, not all zero")
        self.size, self.batch_size, self.train = size, batch_size, train
        self.seed, self.rank, self.world = seed, rank, world
        self.weights = None if weights is None else weights.double()

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, in reading order."""
        if self.train:
            return self._this_rank(self._epoch_draws(epoch))
        return torch.arange(self.rank, self.size, self.world)

    def repeats(self, epoch: int) -> torch.Tensor | None:
        """For each of this rank's draws of `epoch` (aligned with indices(epoch)), how many times its sample was
        drawn before in the epoch, counting every rank's draws in the order of their batches (batch q of rank r
        is the epoch's batch q * world + r): 0 for a first draw. None where no sample repeats (evaluation, the
        permutation)."""
        if not self.train or self.weights is None:
            return None
        draws = self._epoch_draws(epoch)
        positions = torch.arange(len(draws))
        by_sample, order = torch.sort(draws, stable=True)  # a sample's draws stay in epoch order
        starts = torch.ones(len(draws), dtype=torch.bool)
        starts[1:] = by_sample[1:] != by_sample[:-1]
        first_of_sample = torch.cummax(torch.where(starts, positions, 0), 0).values
        repeats = torch.empty_like(draws)
        repeats[order] = positions - first_of_sample
        return self._this_rank(repeats)

    def _epoch_draws(self, epoch: int) -> torch.Tensor:
        """Every rank's training samples of `epoch`, batch after batch (batch q of rank r is q * world + r)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        count = self._per_rank() // self.batch_size * self.world * self.batch_size
        if self.weights is None:
            return torch.randperm(self.size, generator=generator)[:count]
        return torch.multinomial(self.weights, count, replacement=True, generator=generator)

    def _this_rank(self, draws: torch.Tensor) -> torch.Tensor:
        return draws.view(-1, self.world, self.batch_size)[:, self.rank].reshape(-1)

    def _per_rank(self) -> int:
        if self.train:
            return self.size // (self.batch_size * self.world) * self.batch_size
        return len(range(self.rank, self.size, self.world))

    def batches(self, epoch: int) -> list[torch.Tensor]:
        return list(torch.split(self.indices(epoch), self.batch_size))

    def batch_repeats(self, epoch: int) -> list[torch.Tensor | None]:
        """repeats(epoch) cut as batches(epoch) is (a None per batch where nothing repeats)."""
        repeats = self.repeats(epoch)
        return [None] * len(self) if repeats is None else list(torch.split(repeats, self.batch_size))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return -(-self._per_rank() // self.batch_size)


def sample_weights(labels: torch.Tensor, power: float) -> torch.Tensor:
    """Class-balanced sampling: each sample weighted by (its class's count) ** -power. power 0: every sample
    alike (the plain permutation); 1: every class drawn equally often; 0.5: the square root in between
    (rare classes seen more often without repeating their few images as much)."""
    counts = torch.bincount(labels).double()
    return counts[labels] ** -power
