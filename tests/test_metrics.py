"""Metrics against hand-computed values (sklearn's definitions, which REF's evaluator uses)."""
import math

import numpy as np
import pytest
import torch

from bat.metrics import (accuracy, average_precision, classification_metrics, macro_f1, mean_average_precision,
                         per_class_ap)


def test_average_precision_by_hand():
    # ranks: 1 pos (P=1, R=.5), 2 neg, 3 pos (P=2/3, R=1) -> AP = .5*1 + .5*2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)
    # ties form one threshold: {0.5, 0.5} holds one positive of two -> P=.5 at R=.5, then P=2/3 at R=1
    assert average_precision([0.5, 0.5, 0.2], [0, 1, 1]) == pytest.approx(0.25 + 1 / 3)
    # the order inside a tie does not matter
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.25 + 1 / 3)
    assert average_precision([0.1, 0.9], [0, 1]) == 1.0
    assert average_precision([0.9, 0.1], [0, 1]) == 0.5


def test_class_without_positives_counts_zero_as_sklearn():
    # scikit-learn's average_precision_score(average="macro"), which REF reports, gives a class without
    # positives AP 0 (its recall is set to 1 at every threshold); classes_without_positives names it
    scores = np.array([[0.9, 0.2, 0.3], [0.1, 0.8, 0.6], [0.6, 0.3, 0.1]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])  # class 2 has no positive
    ap = per_class_ap(scores, targets)
    assert ap[0] == 1.0 and ap[1] == 1.0 and math.isnan(ap[2])
    assert mean_average_precision(scores, targets) == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3
    scores[2, 1] = 0.95  # negative above the positive: AP(class 1) = .5
    assert mean_average_precision(scores, targets) == pytest.approx((1 + 0.5 + 0) / 3)
    out = classification_metrics(torch.logit(torch.tensor(scores)), torch.tensor(targets), "multilabel",
                                 ["a", "b", "c"])
    assert out["classes_without_positives"] == ["c"] and "accuracy" not in out
    assert all(math.isfinite(out[k]) for k in ("mAP", "macro_f1"))
    # single-label: a class nobody belongs to in the test set also counts 0
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    single = classification_metrics(logits, torch.tensor([0, 1]), "multiclass")
    assert single["mAP"] == pytest.approx(2 / 3) and single["classes_without_positives"] == [2]
    # no positive anywhere: 0, never NaN
    assert mean_average_precision(np.array([[0.2, 0.1]]), np.array([[0, 0]])) == 0.0


def test_macro_f1_multilabel_threshold_and_empty_class():
    targets = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.1],  # 0.5 is not a positive prediction (REF rounds: round(.5) = 0)
                       [0.2, 0.7, 0.1],
                       [0.6, 0.8, 0.1],
                       [0.1, 0.1, 0.1]])
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2 -> 1; class 2: nothing true or predicted -> 0 (sklearn)
    assert macro_f1(scores, targets, "multilabel") == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_multiclass_accuracy_f1_and_map():
    targets = np.array([0, 0, 1, 2])
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0],   # -> 0 correct
                           [0.0, 2.0, 0.0, 0.0],   # -> 1 wrong
                           [0.0, 2.0, 0.0, 0.0],   # -> 1 correct
                           [0.0, 0.0, 1.0, 0.0]])  # -> 2 correct; class 3 never occurs
    out = classification_metrics(logits, torch.tensor(targets), "multiclass")
    assert out["accuracy"] == 0.75
    # F1 over classes present in targets or predictions {0, 1, 2}: 2/3, 2/3, 1
    assert out["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # mAP on softmax probabilities, by hand (e = exp(1)); rows 1 and 2 have equal logits, so they tie everywhere.
    # class 0: e^3/(e^3+3) = .87 (pos), 1/(e+3) = .17 (neg), then the tie 1/(e^2+3) = .096 (one pos, one neg)
    #   -> P=1 at R=.5, then P=2/4 at R=1: AP = .5 * 1 + .5 * .5 = .75
    # class 1: the tie e^2/(e^2+3) = .71 at the top holds the only positive and a negative: AP = .5
    # class 2: e/(e+3) = .48 for its only positive, above everything else: AP = 1; class 3: no positive, AP 0
    assert out["mAP"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.0) / 4) and out["classes_without_positives"] == [3]
    p = logits.double().softmax(1).numpy()
    assert average_precision(p[:, 1], targets == 1) == 0.5  # positive ties with a negative at the top
    assert accuracy(p, targets) == 0.75


def test_map_uses_softmax_not_raw_logits_for_multiclass():
    # Softmax changes the ranking across clips: clip 0 has the larger logit for class 0 but the
    # smaller probability, because its other logit is larger too.
    logits = torch.tensor([[2.0, 2.0], [1.0, -1.0]])
    targets = torch.tensor([1, 0])
    p = logits.softmax(1).numpy()
    assert p[1, 0] > p[0, 0]
    assert classification_metrics(logits, targets, "multiclass")["mAP"] == pytest.approx(1.0)


def test_probabilities_are_float32_as_refs_and_saturated_scores_tie():
    """REF hands float32 sigmoids to scikit-learn: logits 17, 17.5 and 18 all become exactly 1.0 and tie. Class 0
    (positives 17 and 18, negative 17.5): one threshold, precision 2/3 at recall 1 -> AP 2/3 (in float64 the
    negative would rank between the positives: 0.833). Class 1 (logits 0 pos, 1 and -1 neg): AP 1/2. mAP 7/12;
    macro F1 at round(p): class 0 predicts all three (F1 0.8), class 1 only the negative at 0.73 (F1 0)."""
    logits = torch.tensor([[17.0, 0.0], [17.5, 1.0], [18.0, -1.0]])
    m = classification_metrics(logits, torch.tensor([[1, 1], [0, 0], [1, 0]]), "multilabel")
    assert m["mAP"] == pytest.approx(7 / 12) and m["macro_f1"] == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused_not_ranked(bad):
    """A diverged model's NaN (or an inf, whose softmax is NaN) would still give an argmax and a ranking: a
    plausible accuracy and mAP of a broken model."""
    logits = torch.tensor([[bad, 0.0, 0.0], [1.0, 2.0, 3.0]])
    for task, y in (("multiclass", torch.tensor([0, 2])), ("multilabel", torch.tensor([[1, 0, 0], [0, 0, 1]]))):
        with pytest.raises(FloatingPointError, match="NaN or infinite on 1 of 2 clip"):
            classification_metrics(logits, y, task)


def test_best_keeps_a_number_over_a_nan_score_whichever_comes_first():
    """A validation score can be NaN (nothing to score on). Kept first, it compared false with every later score
    and was selected for good; a NaN after a number must not replace it. Ties still go to the later step (REF)."""
    from bat.metrics import Best

    w = {"w": torch.zeros(1)}
    for scores, lower, step in (([float("nan"), 0.2, 0.1], False, 2), ([0.3, float("nan")], False, 1),
                                ([0.5, float("nan"), 0.5], True, 3), ([float("nan"), float("nan")], False, 2)):
        best = Best("m", lower)
        for k, s in enumerate(scores, 1):
            best.update(k, s, w)
        assert best.step == step, scores
