"""Evaluation metrics shared by probe_cgp.py and finetune.py, computed as REF computes them.

All values are fractions in [0, 1] (REF prints them x100; the terminal summaries do too).

- accuracy: top-1 over argmax of the scores (multi-class).
- mAP: macro average precision over *all* classes, as REF's evaluator computes it with scikit-learn's
  `average_precision_score(average="macro")`: AP = sum over score thresholds of (R_n - R_{n-1}) * P_n,
  tied scores forming one threshold. A class without a single positive in the evaluated set scores 0
  (scikit-learn sets its recall to 1 at every threshold, so the sum is 0, and warns), which keeps our
  numbers comparable with REF's; metrics.json lists such classes in `classes_without_positives` so a
  low mAP on a small set can be read correctly. `per_class_ap` returns NaN for them.
- macro F1: per class 2TP / (2TP + FP + FN), averaged. Multi-label predictions are score > 0.5 (REF
  rounds sigmoid outputs, and round(0.5) = 0), over all classes, a class with 2TP + FP + FN = 0 scoring 0
  (sklearn's zero_division=0, what REF reports). Multi-class predictions are the argmax, averaged over
  the classes that occur in the targets or the predictions (sklearn's default label set).

Scores are probabilities as REF evaluates them: softmax over classes for multi-class (the softmax
changes the ranking across clips, so mAP on raw logits would differ) and sigmoid for multi-label, in float32
as REF's are. Where REF differs: a multi-class test set without some class makes scikit-learn (and so REF)
stop with an error; here that class scores 0 and is listed, as for multi-label sets.
"""
import math

import numpy as np
import torch


def scores_from_logits(logits, task):
    """Logits [N, C] -> probabilities as REF evaluates them: float32 (REF hands its model's float32 outputs to
    scikit-learn; in float32 a sigmoid above ~16.6 or a clear softmax winner rounds to exactly 1.0, and such
    clips tie in the ranking as they do in REF). Non-finite logits are refused: their argmax and ranking would
    still give a plausible-looking score."""
    logits = torch.as_tensor(logits).float()
    bad = int((~torch.isfinite(logits)).any(-1).sum()) if logits.numel() else 0
    if bad:
        raise FloatingPointError(f"the model's scores are NaN or infinite on {bad} of {logits.shape[0]} clip(s): "
                                 "its weights diverged (try a lower --lr) or the input holds non-finite values")
    return (logits.softmax(-1) if task == "multiclass" else logits.sigmoid()).numpy()


def one_hot(targets, num_classes):
    t = np.asarray(targets)
    if t.ndim == 2:
        return t.astype(bool)
    out = np.zeros((t.shape[0], num_classes), dtype=bool)
    out[np.arange(t.shape[0]), t] = True
    return out


def average_precision(scores, positives):
    """AP of one class: scores [N], positives [N] bool. NaN when there is no positive."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n_pos = positives.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positives[order]
    tp = np.cumsum(y)
    # One threshold per distinct score: keep the last position of every run of ties.
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp, count = tp[last], last + 1
    precision, recall = tp / count, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_ap(scores, targets):
    """AP for every class: scores [N, C], targets [N] class indices or [N, C] multi-hot -> [C] (NaN: no positive)."""
    scores = np.asarray(scores, dtype=np.float64)
    y = one_hot(targets, scores.shape[1])
    return np.array([average_precision(scores[:, c], y[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores, targets):
    """Macro mAP over all classes, a class without positives counting 0 (scikit-learn, REF)."""
    ap = per_class_ap(scores, targets)
    return float(np.nan_to_num(ap, nan=0.0).mean()) if ap.size else 0.0


def accuracy(scores, targets):
    return float((np.asarray(scores).argmax(1) == np.asarray(targets)).mean())


def _f1(pred, y):
    tp = (pred & y).sum(0)
    denom = 2 * tp + (pred & ~y).sum(0) + (~pred & y).sum(0)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0), denom > 0


def macro_f1(scores, targets, task):
    """Macro F1: multi-label at score > 0.5 over all classes; multi-class on the argmax over the
    classes present in targets or predictions."""
    scores = np.asarray(scores)
    num_classes = scores.shape[1]
    if task == "multilabel":
        f1, _ = _f1(scores > 0.5, one_hot(targets, num_classes))
        return float(f1.mean())
    pred = one_hot(scores.argmax(1), num_classes)
    f1, present = _f1(pred, one_hot(targets, num_classes))
    return float(f1[present].mean())


def classification_metrics(logits, targets, task, classes=None):
    """Everything metrics.json reports for one test set: {accuracy (multi-class), mAP, macro_f1,
    classes_without_positives (names if `classes` is given, else indices)}."""
    scores = scores_from_logits(logits, task)
    targets = np.asarray(torch.as_tensor(targets).cpu().numpy())
    out = {}
    if task == "multiclass":
        out["accuracy"] = accuracy(scores, targets)
    out["mAP"] = mean_average_precision(scores, targets)
    out["macro_f1"] = macro_f1(scores, targets, task)
    empty = np.flatnonzero(~one_hot(targets, scores.shape[1]).any(0)).tolist()
    out["classes_without_positives"] = [classes[i] for i in empty] if classes is not None else empty
    return out


def combine_folds(results, artefact):
    """metrics.json of one run, or of ESC-50 --fold all: mean and population std over folds.

    `results` is a list of (run name, model with `.task`, metrics); `artefact` names the saved model file
    (the last fold's). Returns (metrics, std over folds or None for a single run)."""
    task = results[0][1].task
    if len(results) == 1:
        return {"task": task, **results[0][2]}, None
    keys = [k for k in ("accuracy", "mAP", "macro_f1") if k in results[0][2]]
    per = {k: np.array([m[k] for _, _, m in results], dtype=float) for k in keys + ["num_train", "num_test"]}
    std = {k: float(per[k].std()) for k in keys}
    gates = [m.get("gate_weights") for _, _, m in results]
    gated = gates[0] is not None
    return {"task": task, **{k: float(per[k].mean()) for k in keys}, "std": std,
            "num_train": float(per["num_train"].mean()), "num_test": float(per["num_test"].mean()),
            "gate_weights": np.mean(gates, 0).tolist() if gated else None,
            "gate_weights_std": np.std(gates, 0).tolist() if gated else None,
            "folds": {name: m for name, _, m in results},
            "note": f"mean and population std over folds; num_train/num_test are per-fold means; {artefact} is "
                    "the last fold's, every fold's is in its own folder"}, std


class Best:
    """The one best-on-validation rule of every training loop: update(step, score, state) keeps a copy (on
    the CPU) of `state` when `score` is at least as good as the best so far (ties: the later, as REF).
    Higher is better, or lower with lower=True (WER)."""

    def __init__(self, metric, lower=False):
        self.metric, self.lower = metric, lower
        self.step = self.score = self.state = None

    def update(self, step, score, state):
        if self._better(score):
            self.step, self.score = step, score
            self.state = {k: v.detach().cpu().clone() for k, v in state.items()}

    def _better(self, score) -> bool:
        """At least as good as the best so far. A NaN score (nothing to score on) loses to any number: kept first,
        it would compare false with every later score and be selected for good."""
        if self.score is None:
            return True
        if math.isnan(score) or math.isnan(self.score):
            return math.isnan(self.score)
        return score <= self.score if self.lower else score >= self.score

    def selected(self):
        """metrics.json's `selected`: {"step", "val_<metric>"}; None before any update."""
        return None if self.step is None else {"step": self.step, "val_" + self.metric: self.score}

    def to_dict(self):
        """For a training state (resume); from_dict reads it back."""
        return None if self.step is None else {"step": self.step, "score": self.score, "metric": self.metric,
                                               "lower": self.lower, "state": self.state}

    @classmethod
    def from_dict(cls, d, metric, lower=False):
        best = cls(d.get("metric", metric) if d else metric, d.get("lower", lower) if d else lower)
        if d:  # states written before Best kept the weights under "model"
            best.step, best.score, best.state = d["step"], d["score"], d.get("state", d.get("model"))
        return best


def summarise(metrics, std=None):
    """The terminal summary shared by probe_cgp.py and finetune.py (percent; ± std for --fold all)."""
    lines = []
    for key in ("accuracy", "mAP", "macro_f1", "onset_f1", "frame_mAP", "wer", "cer"):
        if key in metrics:
            pm = f" ± {100 * std[key]:.2f}" if std else ""
            lines.append(f"  {key:9s} {100 * metrics[key]:6.2f}{pm} %")
    lines.append(f"  train {metrics['num_train']} / test {metrics['num_test']} clips, "
                 f"{metrics['skipped_files']} files skipped")
    empty = metrics.get("classes_without_positives") or []
    if empty:
        lines.append(f"  {len(empty)} class(es) without a positive test clip count 0 in mAP (as scikit-learn): "
                     f"{', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}")
    return "\n".join(lines)
