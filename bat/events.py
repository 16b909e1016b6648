"""Sound events from frame scores: REF's post-processing, one definition for training-time metrics (bat.sed)
and the torch-free ONNX runtime (`python -m bat.tag --events`). Imports only numpy."""
from __future__ import annotations

from typing import Sequence

import numpy as np

EVENT_THRESHOLD, MEDIAN_PATCHES = 0.3, 3  # REF's sound event post-processing (engine/evaluator.py)


def median3(x: np.ndarray) -> np.ndarray:
    """scipy.signal.medfilt(x, 3) along axis 0 (zero-padded ends), as REF filters frame scores."""
    p = np.pad(x, ((1, 1),) + ((0, 0),) * (x.ndim - 1))
    return np.median(np.stack([p[:-2], p[1:-1], p[2:]]), axis=0)


def decode_events(times: np.ndarray, scores: np.ndarray, labels: Sequence[str],
                  threshold: float = EVENT_THRESHOLD) -> list[tuple[str, float, float]]:
    """REF's tokens_to_events: median filter of 3 patches, score >= threshold, each run of active
    patches one event from its first patch's time to its last patch's time. Sorted by onset."""
    active = median3(scores) >= threshold if len(scores) else np.zeros((0, len(labels)), bool)
    events = []
    for c, label in enumerate(labels):
        edges = np.diff(np.pad(active[:, c].astype(np.int8), 1))
        for on, off in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            events.append((label, round(float(times[on]), 3), round(float(times[off - 1]), 3)))
    return sorted(events, key=lambda e: (e[1], e[0]))
