"""The log-mel floor: logistic regression on per-clip log-mel statistics (mean and standard deviation of every
mel bin over time), the classical baseline that says what a frozen encoder's probe must beat on a split.

It reads the same model inputs as the probe (the task's spectrograms [N, 1, T, 128]) so both see the same
clips, lengths and padding. The L2 strength is chosen on a stratified held-out part of the training set,
never on the test split; the model is then refitted on the whole training set.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bat.metrics import classification_metrics

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # weight of the squared-weight penalty (per example); small, as HEAR's grids
HELD_OUT = 0.2


def logmel_statistics(spec: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[N, 1, T, F] spectrograms -> [N, 2F] (mean, std over time per bin), in chunks to bound memory."""
    parts = []
    for s in spec.split(chunk):
        s = s.float().squeeze(1)
        parts.append(torch.cat([s.mean(1), s.std(1, unbiased=False)], 1))
    return torch.cat(parts)


def held_out_split(targets: torch.Tensor, fraction: float = HELD_OUT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices with about `fraction` of every class (multi-label: by first positive) held
    out, at least one example per class on each side where a class has two or more."""
    t = targets.cpu().numpy()
    first = t.argmax(1) if t.ndim == 2 else t
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(first):
        idx = rng.permutation(np.flatnonzero(first == c))
        k = min(max(int(round(len(idx) * fraction)), 1), len(idx) - 1) if len(idx) >= 2 else 0
        held += idx[:k].tolist()
    mask = np.zeros(len(t), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, task: str, l2: float,
                 iters: int = 200) -> torch.nn.Linear:
    """Full-batch L-BFGS on softmax (multi-class) or per-class sigmoid (multi-label) cross-entropy."""
    # zeros below, so no random init drawn (which would also move the caller's RNG)
    lin = torch.nn.utils.skip_init(torch.nn.Linear, x.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")
    x = x.double()
    target = y.long() if task == "multiclass" else y.double()

    def closure():
        opt.zero_grad()
        z = lin(x)
        loss = F.cross_entropy(z, target) if task == "multiclass" else F.binary_cross_entropy_with_logits(z, target)
        loss = loss + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def held_out_score(metrics: dict, task: str) -> float:
    return metrics["accuracy"] if task == "multiclass" else metrics["mAP"]


@torch.no_grad()
def _logits(lin, x):
    return lin(x.double()).float()


def logmel_floor(train_spec, train_targets, test_spec, test_targets, task: str, num_classes: int,
                 classes=None, seed: int = 0) -> dict:
    """metrics.json's `baseline.logmel` from spectrograms [N, 1, T, F] (see floor_from_statistics)."""
    return floor_from_statistics(logmel_statistics(train_spec), train_targets, logmel_statistics(test_spec),
                                 test_targets, task, num_classes, classes, seed)


def floor_from_statistics(x_train, train_targets, x_test, test_targets, task: str, num_classes: int,
                          classes=None, seed: int = 0) -> dict:
    """The test metrics of logistic regression on log-mel statistics [N, 2F], its held-out score and the
    chosen L2 strength (selected on a held-out part of the training set, then refitted on all of it)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # standardised with training statistics only
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.as_tensor(train_targets)
    fit, held = held_out_split(y_train, seed=seed)
    scores = {}
    for l2 in L2_GRID:
        with torch.enable_grad():
            lin = fit_logistic(x_train[fit], y_train[fit], num_classes, task, l2)
        scores[l2] = held_out_score(classification_metrics(_logits(lin, x_train[held]), y_train[held], task), task)
    best = max(L2_GRID, key=lambda l2: (scores[l2], -l2))  # ties: the weaker penalty
    with torch.enable_grad():
        lin = fit_logistic(x_train, y_train, num_classes, task, best)
    out = classification_metrics(_logits(lin, x_test), test_targets, task, classes)
    return {**{k: out[k] for k in ("accuracy", "mAP", "macro_f1") if k in out}, "held_out": scores[best],
            "l2": best, "features": "mean and std of each log-mel bin over time", "num_held_out": int(len(held)),
            "num_train": int(len(y_train)), "num_test": int(len(x_test))}


@torch.no_grad()
def dataset_statistics(dataset, frontend, batch_size: int, workers: int, skips, device=None):
    """(log-mel statistics [N, 2F], targets) of every usable clip of an AudioDataset, through `frontend` as
    the probe sees them (bat.tasks.model_inputs); the spectrograms are reduced batch by batch, so a large
    set never holds them all."""
    from bat.data import make_loader
    from bat.tasks import model_inputs

    stats, targets = [], []
    for batch in make_loader(dataset, batch_size, workers=min(workers, len(dataset))):
        skips.add(batch.skipped)
        if len(batch):
            stats.append(logmel_statistics(model_inputs(frontend, batch, device)).cpu())
            targets.append(batch.targets)
    if not stats:
        raise skips.nothing_usable(dataset.items.files, "the log-mel floor's data")
    return torch.cat(stats), torch.cat(targets)


def logmel_floor_of(train_set, test_set, frontend, task: str, classes, batch_size: int = 32, workers: int = 0,
                    skips=None, device=None, seed: int = 0) -> dict:
    """probe_cgp.py --baseline logmel: the floor on the probe's own train and test AudioDatasets."""
    from bat.data import SkipLog

    skips = SkipLog() if skips is None else skips
    x, y = dataset_statistics(train_set, frontend, batch_size, workers, skips, device)
    xt, yt = dataset_statistics(test_set, frontend, batch_size, workers, skips, device)
    return floor_from_statistics(x, y, xt, yt, task, len(classes), classes, seed)


def mean_floor(per_fold: list[dict]) -> dict:
    """--fold all: the floor's metrics averaged over folds, with their population std (as the probe's)."""
    keys = [k for k in ("accuracy", "mAP", "macro_f1", "held_out") if k in per_fold[0]]
    return {**{k: float(np.mean([f[k] for f in per_fold])) for k in keys},
            "std": {k: float(np.std([f[k] for f in per_fold])) for k in keys}, "features": per_fold[0]["features"]}
