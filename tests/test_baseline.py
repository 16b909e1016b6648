"""The log-mel floor (bat.baseline): logistic regression on per-clip log-mel statistics, L2 chosen on a
held-out part of the training set only."""

import numpy as np
import torch

from bat.baseline import held_out_split, logmel_floor, logmel_statistics


def spectra(n_per_class, classes, seed):
    """Class c raises mel bins [16c, 16c + 16) by 1 (in noise of std 1): separable by the bin means only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_per_class * classes, 1, 50, 128, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    for c in range(classes):
        x[y == c, :, :, 16 * c:16 * c + 16] += 1.0
    return x, y


def test_statistics_are_mean_and_std_over_time():
    x = torch.randn(3, 1, 40, 128)
    s = logmel_statistics(x, chunk=2)
    assert s.shape == (3, 256)
    torch.testing.assert_close(s[:, :128], x.squeeze(1).mean(1))
    torch.testing.assert_close(s[:, 128:], x.squeeze(1).std(1, unbiased=False))


def test_held_out_split_is_stratified_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = held_out_split(y, 0.2, seed=0)
    assert set(fit).isdisjoint(held) and len(fit) + len(held) == len(y)
    assert np.bincount(y[held].numpy(), minlength=3).tolist() == [2, 1, 0]  # the single clip stays in fit


def test_floor_learns_a_separable_set_and_is_at_chance_on_random_labels():
    x, y = spectra(12, 4, seed=0)
    xt, yt = spectra(8, 4, seed=1)
    good = logmel_floor(x, y, xt, yt, "multiclass", 4)
    assert good["accuracy"] > 0.9 and good["held_out"] > 0.8 and good["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    bad = logmel_floor(x, shuffled, xt, yt, "multiclass", 4)
    assert bad["accuracy"] < 0.6


def test_selection_never_reads_the_test_labels():
    x, y = spectra(10, 3, seed=2)
    xt, yt = spectra(6, 3, seed=3)
    a = logmel_floor(x, y, xt, yt, "multiclass", 3)
    b = logmel_floor(x, y, xt, yt.flip(0), "multiclass", 3)
    assert (a["l2"], a["held_out"]) == (b["l2"], b["held_out"])


def test_multilabel_floor_reports_map():
    x, y = spectra(10, 3, seed=4)
    targets = torch.nn.functional.one_hot(y, 3).float()
    xt, yt = spectra(6, 3, seed=5)
    out = logmel_floor(x, targets, xt, torch.nn.functional.one_hot(yt, 3).float(), "multilabel", 3)
    assert "accuracy" not in out and out["mAP"] > 0.9


def test_fitting_the_floor_leaves_the_callers_rng_alone():
    """The floor's logistic regression starts from zeros: it needs no random draw, and it must not reset or move
    torch's global RNG (it reseeded it with 0 for every fit, clobbering a caller's stream)."""
    from bat.baseline import fit_logistic

    x, y = torch.randn(12, 4), torch.arange(12) % 3
    torch.manual_seed(7)
    want = torch.rand(2)
    torch.manual_seed(7)
    lin = fit_logistic(x, y, 3, "multiclass", 0.1, iters=5)
    assert torch.equal(torch.rand(2), want) and lin.weight.dtype == torch.float64
