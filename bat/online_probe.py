"""The online probe of pretrain.py: a small labelled set, a closed-form ridge classifier on the frozen
student's features at step 0 (the random-init baseline) and every --probe-every steps, and the curves
(losses, target/prediction spread, probe accuracy) drawn into DIR/curves.png.
"""
from __future__ import annotations

import os

import torch

from bat.audio import SAMPLE_RATE
from bat.model import Encoder, eval_mode

# ----------------------------------------------------------------------------------- the probe


def probe_set(path, max_clips, crop_samples, target_frames, skips):
    """(spectrograms float16 (M, 1, T, 128), labels (M,), is_test (M,)) of a small labelled set (a folder or
    CSV, shards, or "demo"): at most max_clips clips, 70 % to fit the probe and 30 % to score it, each cut to
    crop_samples. Unreadable files go to `skips`."""
    from bat.data import AudioDataset, Skipped
    from bat.frontend import spectrogram
    from bat.listing import DataError, list_dataset, stratified_split

    if path == "demo":
        from bat.demo import DEMO_CLASSES, demo_clip

        clips = [demo_clip(i, seed=1, seconds=crop_samples / SAMPLE_RATE) for i in range(max_clips)]
        waves = [torch.from_numpy(w) for w, _ in clips]
        labels = torch.tensor([DEMO_CLASSES.index(c) for _, c in clips])
        is_test = torch.arange(len(waves)) % 10 >= 7
    else:
        items = list_dataset(path)
        if items.task != "multiclass":
            raise DataError(f"--probe-data {path}: needs single-label data, this is {items.task}")
        if len(items) > max_clips:
            items = items.subset(torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:max_clips])
        train, test = stratified_split(items, 0.3, seed=0)
        waves, labels, is_test = [], [], []
        for part, flag in ((train, False), (test, True)):
            dataset = AudioDataset(part, classes=items.classes)  # the data layer: files, CSV windows, shard members
            for i in range(len(dataset)):
                clip = dataset[i]  # an Example, or Skipped for a clip that cannot be read
                if isinstance(clip, Skipped):
                    skips.add([(clip.path, clip.reason)])
                    continue
                waves.append(clip.waveform[:crop_samples])
                labels.append(clip.target)
                is_test.append(flag)
        labels, is_test = torch.tensor(labels, dtype=torch.long), torch.tensor(is_test, dtype=torch.bool)
    if is_test.all() or not is_test.any():  # before torch.cat, which cannot take no clips at all
        raise DataError(f"--probe-data {path}: too few usable clips to fit and score a probe")
    specs = torch.cat([spectrogram(w[None], target_frames) for w in waves]).half()
    return specs, labels, is_test


@torch.no_grad()
def probe_accuracy(encoder: Encoder, probe, device, autocast) -> float:
    """Ridge classifier on the frozen student's last-block CLS + mean patch token, fitted and scored on a
    probe_set; `autocast` is the training's autocast context."""
    specs, labels, is_test = probe
    feats = []
    with eval_mode(encoder):  # pretrain.py hands over the training student
        for chunk in specs.split(32):
            with autocast:
                last = encoder.forward_layers(chunk.to(device).float())[-1].float()
            feats.append(torch.cat([last[:, 0], last[:, 1:].mean(1)], dim=1).cpu())
    x = torch.cat(feats)
    return ridge_probe_accuracy(x[~is_test], labels[~is_test], x[is_test], labels[is_test], int(labels.max()) + 1)


def ridge_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                         num_classes: int, l2: float = 0.1) -> float:
    """Closed-form ridge-regression classifier on frozen features -> test accuracy.

    Features are standardised with the training statistics; W = (X'X + l2 * n * I)^-1 X'Y with
    one-hot Y and a bias column (not penalised); prediction = argmax. Seconds on the CPU, no
    hyper-parameter search: a cheap, deterministic signal that the representation is learning.
    """
    x, xt = train_x.double(), test_x.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    x, xt = (x - mu) / sd, (xt - mu) / sd
    x, xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), torch.cat([xt, torch.ones(len(xt), 1, dtype=x.dtype)], 1)
    y = torch.nn.functional.one_hot(train_y.long(), num_classes).double()
    reg = torch.eye(x.shape[1], dtype=x.dtype) * l2 * len(x)
    reg[-1, -1] = 0.0
    w = torch.linalg.solve(x.T @ x + reg, x.T @ y)
    return float(((xt @ w).argmax(1) == test_y.long()).double().mean())


# ----------------------------------------------------------------------------------- the curves


def save_curves(records: list[dict], path) -> None:
    """Draw pretrain.py's log (one dict per logged step) as one PNG: the losses, the spread of the
    targets and of the predictions (collapse shows as a fall towards 0), and the online probe's
    accuracy, whose step-0 point is the random-initialised encoder (the baseline to beat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]  # step 0: the probe only
        return [s for s, _ in rows], [v for _, v in rows]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for key, label in (("loss", "total"), ("loss_global", "global (CLS)"), ("loss_local", "local (masked patches)")):
        axes[0].plot(*series(key), label=label)
    axes[0].set(title="losses", xlabel="step", yscale="log")
    for key, label in (("target_std", "targets"), ("pred_std", "predictions")):
        axes[1].plot(*series(key), label=label)
    axes[1].set(title="spread (std over tokens)", xlabel="step", ylim=(0, None))
    steps, acc = series("probe_acc")
    if steps:
        axes[2].plot(steps, [100 * a for a in acc], "o-", label="ridge probe, student")
        if steps[0] == 0:
            axes[2].axhline(100 * acc[0], color="grey", ls="--", lw=0.8, label="random init (step 0)")
    else:
        axes[2].text(0.5, 0.5, "no --probe-data", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set(title="probe accuracy on --probe-data (%)", xlabel="step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"  # readers never see a half-written file
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
