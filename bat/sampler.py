"""Class-balanced sampling for (multi-label) training sets, aware of distributed training.

REF's AudioSet-2M recipe: every clip gets the weight mean_{c in labels(clip)} 1 / count(c), and each
epoch draws N clips (REF: 200 000) *without replacement* with probability proportional to those weights.
Rare classes are then seen far more often than their share of the data, while no clip repeats within an
epoch. A set smaller than N is drawn *with* replacement (without, N clips of N would be every clip once:
no balancing at all).

REF's HSN recipe weighs a recording by the inverse frequency of its *first* label only and draws one
training set's worth of recordings per epoch, with replacement (`by="first-label"`).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from bat.data import ClipKey, Loader
from bat.listing import LabelIds

REF_EPOCH_CLIPS = 200_000  # clips per balanced epoch (REF's data factory, AudioSet-2M)


def _multi_hot(labels, num_classes: int | None = None) -> torch.Tensor:
    """labels: [N, C] multi-hot/one-hot tensor, [N] integer class ids, or a list of label-id lists."""
    if isinstance(labels, torch.Tensor) and labels.ndim == 2:
        return (labels > 0).float()
    if isinstance(labels, torch.Tensor) and labels.ndim == 1:
        labels = [[int(c)] for c in labels.tolist()]
    labels = [list(ls) if isinstance(ls, (list, tuple, set)) else [int(ls)] for ls in labels]
    if num_classes is None:
        num_classes = 1 + max((c for ls in labels for c in ls), default=-1)
    out = torch.zeros(len(labels), max(num_classes, 1))
    rows = [i for i, ls in enumerate(labels) for _ in ls]
    cols = [c for ls in labels for c in ls]
    if cols and (min(cols) < 0 or max(cols) >= num_classes):
        raise ValueError(f"label ids must lie in [0, {num_classes}), got {min(cols)}..{max(cols)}")
    out[rows, cols] = 1.0
    return out


def _label_pairs(labels, num_classes: int | None = None):
    """(clip index, class id) of every label, clip count and class count, from any form _multi_hot takes or
    a bat.listing.LabelIds (compressed ids: no [N, C] matrix, which is 4.2 GB for AudioSet-2M)."""
    if isinstance(labels, LabelIds):
        rows = torch.repeat_interleave(torch.arange(len(labels)), torch.from_numpy(np.diff(labels.offsets)))
        return rows, torch.from_numpy(labels.ids), len(labels), labels.num_classes
    y = _multi_hot(labels, num_classes)
    rows, cols = y.nonzero(as_tuple=True)
    return rows, cols, y.shape[0], y.shape[1]


def balanced_weights(labels, num_classes: int | None = None) -> torch.Tensor:
    """Per-clip weight = mean inverse frequency of the clip's labels (REF, AudioSet-2M), float64 [N].

    Unlike REF (which gives a clip without labels the weight 1.0, i.e. far above every labelled clip),
    clips without any label count as one more class of their own. Computed label by label (two bincounts),
    never as an [N, C] matrix.
    """
    rows, cols, n, c = _label_pairs(labels, num_classes)
    counts = torch.bincount(cols, minlength=c).double()
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    n_labels = torch.bincount(rows, minlength=n).double()
    w = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, inv[cols]) / n_labels.clamp(min=1)
    unlabelled = n_labels == 0
    if unlabelled.any():
        w[unlabelled] = 1.0 / unlabelled.sum()
    return w


def first_label_weights(first) -> torch.Tensor:
    """Per-clip weight = 1 / (number of clips with the same first label) (REF, HSN), float64 [N].
    `first`: each clip's first class id, -1 for a clip without labels (they count as one class)."""
    first = torch.as_tensor(first, dtype=torch.long).reshape(-1)
    _, which, counts = torch.unique(first, return_inverse=True, return_counts=True)
    return 1.0 / counts[which].double()


class BalancedSampler(Sampler[int]):
    """Draw `num_samples` clips per epoch without replacement, with class-balancing weights.

    Distributed-aware like torch's DistributedSampler: every rank draws the same epoch from
    (seed, epoch), pads it to a multiple of the world size by repeating its start, and takes every
    world-size-th index from its rank on, so the ranks see disjoint clips of one balanced epoch.
    Call `set_epoch(e)` before each epoch for a fresh draw. by="first-label" (REF's HSN): `labels` are the
    clips' first class ids, and an epoch is, unless `num_samples` says otherwise, N draws with replacement.
    """

    def __init__(self, labels, num_samples: int | None = None, num_classes: int | None = None,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, replacement: bool | None = None,
                 by: str = "labels"):
        if by not in ("labels", "first-label"):
            raise ValueError(f"balanced sampling by 'labels' or 'first-label', got {by!r}")
        first = by == "first-label"
        self.weights = first_label_weights(labels) if first else balanced_weights(labels, num_classes)
        n = len(self.weights)
        if n == 0:
            raise ValueError("balanced sampling needs at least one training clip")
        self.num_samples = (n if first else REF_EPOCH_CLIPS) if num_samples is None else int(num_samples)
        self.replacement = (first or self.num_samples > n) if replacement is None else replacement
        if self.num_samples < 1 or (not self.replacement and self.num_samples > n):
            raise ValueError(f"clips per epoch must be in 1..{n} (the number of training clips) when sampling "
                             f"without replacement, got {self.num_samples}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside world size {num_replicas}")
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.per_rank = math.ceil(self.num_samples / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> torch.Tensor:
        """The whole epoch's draw (identical on every rank), before splitting across ranks."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.multinomial(self.weights, self.num_samples, replacement=self.replacement, generator=g)

    def __iter__(self) -> Iterator[int]:
        idx = self.epoch_indices()
        total = self.per_rank * self.num_replicas
        if total > len(idx):  # pad so every rank gets the same number of batches (DDP needs it)
            idx = torch.cat([idx, idx[: total - len(idx)]])
        return iter(idx[self.rank:total:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank


def class_frequencies(labels, indices: Sequence[int] | torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Share of each class among the labels of the clips at `indices` (a diagnostic, used by tests)."""
    rows, cols, n, c = _label_pairs(labels, num_classes)
    drawn = torch.bincount(torch.as_tensor(indices, dtype=torch.long).reshape(-1), minlength=n)  # per clip
    counts = torch.bincount(cols, weights=drawn[rows].double(), minlength=c)
    return counts / counts.sum()


class EpochBatches(Sampler[list]):
    """A batch sampler that runs a (set_epoch-able) sampler epoch after epoch, forever, in batches.

    Training counts steps, not epochs; with this as `batch_sampler` one DataLoader (and its worker
    processes) serves the whole run. `start` skips that many batches of the stream, so a resumed run
    continues with exactly the batch an uninterrupted run would have drawn next: epoch e's order is a
    pure function of (seed, e), and every epoch of a rank has the same number of batches. The last
    batch of an epoch may be smaller (no clip is dropped).

    With `draws=(seed, rank)` a batch lists ClipKeys instead of indices: the clip in slot j of the stream's
    batch b is ClipKey(index, (seed, rank, b, j)), so a dataset that seeds a clip's random draws by its key
    (AudioDataset, bat.sed.EventDataset) repeats them on resume, whichever loader worker reads it.
    """

    def __init__(self, sampler, batch_size: int, start: int = 0, draws: tuple[int, int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if not hasattr(sampler, "set_epoch"):  # each epoch's order must be a function of (seed, epoch): exact resume
            raise TypeError(f"EpochBatches needs a sampler with set_epoch (DistributedSampler, BalancedSampler), got "
                            f"{type(sampler).__name__}")
        if len(sampler) == 0:
            raise ValueError("no training clips for this process (fewer clips than processes?)")
        self.sampler, self.batch_size, self.start, self.draws = sampler, batch_size, start, draws
        self.per_epoch = math.ceil(len(sampler) / batch_size)

    def position(self, consumed: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of the consumed-th batch of the stream."""
        return divmod(consumed, self.per_epoch)

    def __iter__(self) -> Iterator[list]:
        epoch, pos = self.position(self.start)
        while True:
            self.sampler.set_epoch(epoch)
            idx = list(self.sampler)
            for b in range(pos, self.per_epoch):
                batch = idx[b * self.batch_size:(b + 1) * self.batch_size]
                if self.draws is not None:  # keyed on the batch's place in the whole stream, not in this loader's
                    batch = [ClipKey(i, (*self.draws, epoch * self.per_epoch + b, j)) for j, i in enumerate(batch)]
                yield batch
            epoch, pos = epoch + 1, 0

    def __len__(self):  # infinite; DataLoader only needs this for len(loader), which we never call
        raise TypeError("EpochBatches is an endless stream of batches")


def epoch_sampler(n, labels=None, balanced=False, epoch_clips=None, num_classes=None, world=1, rank=0, seed=0,
                  by="labels"):
    """The per-epoch sampler of a training run over n clips: a shuffle (DistributedSampler; one process is
    world=1), or REF's class-balanced draw of `epoch_clips` clips from `labels` (by="labels": multi-hot
    targets, default 200 000 clips; by="first-label": first class ids, default n clips, with replacement)."""
    if balanced:
        return BalancedSampler(labels, epoch_clips, num_classes, num_replicas=world, rank=rank, seed=seed, by=by)
    return torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)


def batch_stream(dataset, sampler, batch_size, workers=0, seed=0, start=0, collate_fn=None, rank=0, keyed=False):
    """An endless iterator of batches: the sampler's epochs one after another (EpochBatches), loaded by
    one DataLoader for the whole run, starting `start` batches into the stream (resume). Returns
    (iterator, EpochBatches). keyed=True: the dataset is asked for ClipKeys (AudioDataset,
    bat.sed.EventDataset), so a clip's random draws (its roll, window and noise) are a function of (seed,
    rank, its place in the stream) and a resumed stream repeats them with any number of workers; otherwise a
    worker draws from its own global RNG, seeded from (seed, start, rank). Either way the draws differ per rank."""
    batches = EpochBatches(sampler, batch_size, start, (seed, rank) if keyed else None)
    # Own generator for the worker seeds, so starting a loader draws nothing from the main process's global
    # RNG (a resumed run's augmentations would otherwise diverge from an uninterrupted one's).
    gen = torch.Generator().manual_seed(seed * 7919 + start + 1_000_003 * rank)
    loader = Loader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn,
                    generator=gen, pin_memory=torch.cuda.is_available(), persistent_workers=False)
    return iter(loader), batches
