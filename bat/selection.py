"""Model selection on your own data (probe_cgp.py --select auto): a stratified held-out part of the
training set, early stopping on it, and the learning rate of a small grid that scores best there. This is
HEAR 2021's downstream protocol (a small grid, early stopping on validation data), applied where a data set
brings no validation split of its own. The test split is never read for any choice: the held-out clips are
drawn from the training list only, and only the chosen head is tested.

REF's benchmark recipes (--task esc50, audioset, scv2, ...) keep REF's fixed schedules: `applies` is true
for the generic task only.
"""
from __future__ import annotations

import dataclasses
import math

from bat.listing import stratified_split

SELECTION_RULE = ("held-out part of the training set: every learning rate trains until the held-out score has "
                  "not improved for `patience` evaluations (--steps is the cap), its best head is kept; the lr "
                  "whose best head scores highest there is tested")


def applies(select: str, task, run) -> bool:
    """--select auto: the generic task (your own data) without a validation split of its own."""
    return select == "auto" and task.name == "generic" and (run.val is None or len(run.val) == 0)


def carve_held_out(run, fraction: float, seed: int):
    """The run with `val` = a stratified `fraction` of run.train (by first label, at least one clip of every
    class with two or more on each side) and `train` = the rest. Only run.train is split."""
    fit, held = stratified_split(run.train, fraction, seed)
    return dataclasses.replace(run, train=fit, val=held)


# The default grid, as multiples of --lr: REF's 1e-3 and two larger values, since a probe stopped early
# gets fewer steps than REF's fixed schedule and a small set's head converges faster at a higher lr.
GRID = (1, 3, 10)
MIN_EVAL_STEPS = 10  # a small set's epoch is a few steps: evaluating more often only adds noise and time


def eval_every(clips: int, batch_size: int) -> int:
    """Steps between held-out evaluations: one pass over `clips` training clips, at least MIN_EVAL_STEPS
    (with cached features an evaluation costs about one training step, so every epoch is cheap)."""
    return max(MIN_EVAL_STEPS, math.ceil(clips / batch_size))


class EarlyStop:
    """update(step, score) -> True once the held-out score has not improved (strictly) for `patience`
    evaluations. Evaluations up to `start` (the warm-up, while the lr still rises) do not count: a head
    that has not yet seen the peak lr is not converged. Ties do not count as improvement, so a plateau
    stops; bat.metrics.Best keeps the latest of the tied heads."""

    def __init__(self, patience: int, lower: bool = False, start: int = 0):
        self.patience, self.lower, self.start = patience, lower, start
        self.best, self.since = None, 0

    def update(self, step: int, score: float) -> bool:
        if self.best is None or (score < self.best if self.lower else score > self.best):
            self.best, self.since = score, 0
        elif step > self.start:
            self.since += 1
        return self.since >= self.patience


def pick_lr(scores: dict, lower: bool = False) -> float:
    """The learning rate with the best held-out score; ties: the smaller lr."""
    return min(scores, key=lambda lr: (scores[lr] if lower else -scores[lr], lr))


def report(tried: dict, chosen: float, metric: str, patience: int, every: int, num_clips: int) -> tuple[dict, dict]:
    """metrics.json's (`held_out`, `selection`). `tried` maps lr -> the fit record of that lr (`selected`,
    `history`, `stopped_at`); `held_out` holds the chosen head's held-out metrics (the number the choice was
    made on, so an optimistic estimate; the test score beside it is not)."""
    sel = tried[chosen]["selected"]
    at = next(r for r in tried[chosen]["history"] if r["step"] == sel["step"])
    held = {k: at[k] for k in ("accuracy", "mAP", "macro_f1") if k in at}
    held.update(num_clips=num_clips, step=sel["step"], lr=chosen)
    return held, {"rule": SELECTION_RULE, "metric": metric, "lr": chosen, "step": sel["step"], "patience": patience,
                  "eval_every": every, "lr_grid": {f"{lr:g}": t["selected"]["val_" + metric] for lr, t in tried.items()},
                  "stopped_at": {f"{lr:g}": t["stopped_at"] for lr, t in tried.items()}}


def summary_lines(metrics: dict) -> list[str]:
    """The summary's lines for the held-out selection and the log-mel floor (when present)."""
    lines, held, floor = [], metrics.get("held_out"), (metrics.get("baseline") or {}).get("logmel")
    key = "accuracy" if "accuracy" in metrics else "mAP"
    if held:
        sel = metrics["selection"]
        grid = ", ".join(f"{lr} {100 * s:.1f}" for lr, s in sel["lr_grid"].items())
        lines.append(f"  held-out {key} {100 * held[key]:.2f} % on {held['num_clips']} training clips held out "
                     f"(lr {held['lr']:g}, step {held['step']}; per lr: {grid}), test {100 * metrics[key]:.2f} %")
        if len(sel["lr_grid"]) > 1 and f"{held['lr']:g}" == max(sel["lr_grid"], key=float):  # keys as written
            # Measured on small sets: the grid's top often wins, and larger steps can score higher still
            # (for random-init encoders mostly; a pretrained encoder's CGP probe did worse on test there).
            lines.append(f"  note: the largest lr tried won; --lr-grid with larger values (e.g. {3 * held['lr']:g} "
                         f"{10 * held['lr']:g}) may score higher on the held-out part")
    if floor and key in floor:
        lines.append(f"  log-mel floor (logistic regression on mel mean/std, L2 {floor['l2']:g}): {key} "
                     f"{100 * floor[key]:.2f} % on the same split")
    return lines
