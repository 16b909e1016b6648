"""Record reference results of the third-party metric code REF evaluates with, for tests/test_sed.py and
tests/test_asr.py: sed_eval 0.2.1 (onset-only event F1, 200 ms collar), scipy.signal.medfilt and
jiwer 4.0 (WER, CER). These packages are not dependencies of bat; run this once in an environment that
has them (pip install sed_eval jiwer) and commit the JSON it writes:

    python tests/make_metric_cases.py   # -> tests/golden/metric_cases.json

The event lists are random but seeded, on the 160 ms patch grid the way bat.sed.detect_events makes
estimates (onsets k * 0.16 s) against references with arbitrary millisecond onsets, so collar edges,
several events per class, unmatched labels and empty files all occur.
"""
import json
import random
from pathlib import Path

import jiwer
import numpy as np
import scipy.signal
import sed_eval

OUT = Path(__file__).resolve().parent / "golden" / "metric_cases.json"
LABELS = ["dog", "door", "speech", "phone"]


def random_file(rng):
    """(reference events, estimated events) of one file: estimates near references, plus strays."""
    ref = []
    for _ in range(rng.randint(0, 6)):
        onset = round(rng.uniform(0, 30), 3)
        ref.append((rng.choice(LABELS), onset, round(onset + rng.uniform(0.1, 3), 3)))
    est = []
    for label, onset, _ in ref:
        if rng.random() < 0.7:  # a detection somewhere around the true onset, on the patch grid
            k = max(0, round((onset + rng.uniform(-0.45, 0.45)) / 0.16))
            est.append((label if rng.random() < 0.85 else rng.choice(LABELS), k * 160.0 / 1000, (k + 5) * 160.0 / 1000))
    for _ in range(rng.randint(0, 3)):
        k = rng.randint(0, 190)
        est.append((rng.choice(LABELS), k * 160.0 / 1000, (k + 2) * 160.0 / 1000))
    return ref, est


def sed_eval_overall(files):
    metric = sed_eval.sound_event.EventBasedMetrics(event_label_list=LABELS, t_collar=0.200, evaluate_onset=True,
                                                    evaluate_offset=False)
    as_dicts = lambda evs: [{"event_label": l, "event_onset": a, "event_offset": b} for l, a, b in evs]  # noqa: E731
    for ref, est in files:
        metric.evaluate(reference_event_list=as_dicts(ref), estimated_event_list=as_dicts(est))
    f = metric.results()["overall"]["f_measure"]
    return {k: (None if np.isnan(v) else float(v)) for k, v in f.items()}


def main():
    rng = random.Random(13)
    onset_cases = []
    for n_files in (1, 1, 2, 3, 5, 8, 8, 12):
        files = [random_file(rng) for _ in range(n_files)]
        onset_cases.append({"files": [{"ref": r, "est": e} for r, e in files], "sed_eval": sed_eval_overall(files)})
    # one case without any estimate (sed_eval: precision and F1 undefined)
    files = [random_file(rng)[0:1] + ([],) for _ in range(2)]
    onset_cases.append({"files": [{"ref": r, "est": e} for r, e in files], "sed_eval": sed_eval_overall(files)})

    nrng = np.random.default_rng(13)
    medfilt_cases = []
    for n in (1, 2, 5, 40):
        x = nrng.random(n).round(3)
        x[nrng.random(n) < 0.3] = 0.0
        medfilt_cases.append({"x": x.tolist(), "medfilt3": scipy.signal.medfilt(x, kernel_size=3).tolist()})

    words = "the cat sat on a mat dog ran far it's up down left right".split()
    asr_cases = []
    for _ in range(6):
        refs = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(rng.randint(1, 4))]
        hyps = []
        for r in refs:
            w = r.split()
            if w and rng.random() < 0.5:
                w[rng.randrange(len(w))] = rng.choice(words)
            if rng.random() < 0.3:
                w.insert(rng.randrange(len(w) + 1), rng.choice(words))
            if len(w) > 1 and rng.random() < 0.3:
                del w[rng.randrange(len(w))]
            h = " ".join(w)
            if rng.random() < 0.4 and h:  # character-level damage, as greedy CTC output has
                i = rng.randrange(len(h))
                h = h[:i] + rng.choice("abcdefgh' ") + h[i + 1:]
            hyps.append(h)
        asr_cases.append({"refs": refs, "hyps": hyps, "wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps)})

    OUT.write_text(json.dumps({"generator": "tests/make_metric_cases.py",
                               "versions": {"sed_eval": "0.2.1", "scipy": scipy.__version__, "jiwer": jiwer.__version__ if hasattr(jiwer, "__version__") else "4.0.0"},
                               "onset_f1": onset_cases, "medfilt": medfilt_cases, "wer_cer": asr_cases}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
