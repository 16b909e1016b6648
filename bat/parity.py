"""How far two float32 runs of the same network may differ: the tolerance of export.py's check (onnxruntime
vs PyTorch), of the tests and of the benchmarks, in one place. Torch-free (numpy only).

Two correct float32 implementations differ only by rounding, and rounding is relative to the size of the
numbers: a fixed absolute tolerance (the old 1e-4) is too tight for a confident head (logits in the
hundreds) and too loose for small embeddings, and which side of it a run lands on depends on the CPU's
vector kernels (AVX2 and AVX-512 sum in different orders). So the tolerance is built from the graph:

- A dot product of K float32 terms carries a rounding error of about sqrt(K) * eps relative to the sum of
  its terms' magnitudes (the probabilistic bound of Higham and Mary, SIAM J. Sci. Comput. 2019, at
  lambda = LAMBDA). The longest reduction of our graphs is the front-end's DFT (n_fft terms) or the MLP's
  hidden layer (dim * mlp_ratio terms): K = the larger.
- Every stage (front-end, each block, head) is renormalised (LayerNorm, softmax), so its errors do not
  compound; they add up over the stages, in the worst case linearly: depth + 2 stages.
- Features (`embedding`, `layers`) are compared at their own scale (their largest magnitude in the float32
  reference). Scores are probabilities of logits: the error of a probability is at most the slope of
  softmax (1/2, the infinity norm of its Jacobian) or sigmoid (1/4) times the error of the logits, which is
  relative to the logits' magnitude (the largest |logit| of the reference).
"""
from __future__ import annotations

import math

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23
LAMBDA = 2.0  # the bound's multiplier: 2 covers the tail of the values compared; a constant, fitted to no machine
SLOPES = {"multiclass": 0.5, "multilabel": 0.25}  # largest d(probability)/d(logit): softmax, sigmoid
SCORE_OUTPUTS = ("scores", "window_scores", "frame_scores")


def relative_error_budget(depth: int, width: int) -> float:
    """Largest relative difference of two float32 runs of a network with `depth` blocks whose longest
    reduction has `width` terms (front-end and head count as one stage each)."""
    return LAMBDA * FLOAT32_EPS * math.sqrt(width) * (depth + 2)


def graph_budget(model_config: dict, n_fft: int = 1024) -> float:
    """relative_error_budget for an encoder configuration (EncoderConfig.to_dict()) behind a front-end
    whose DFT has n_fft terms."""
    width = max(int(model_config["dim"] * model_config.get("mlp_ratio", 4.0)), int(n_fft))
    return relative_error_budget(int(model_config["depth"]), width)


def output_tolerances(reference: dict, budget: float, task: str | None = None) -> dict:
    """{output name: largest allowed absolute difference} for the float32 reference outputs (numpy arrays;
    `logits` must be among them when score outputs are). Scores: slope x budget x max |logit|; everything
    else: budget x its own largest magnitude. A scale of 0 (all-zero output) allows only exact equality."""
    def scale(x):
        return float(np.abs(x).max()) if np.size(x) else 0.0

    out = {}
    for name, value in reference.items():
        if name == "logits":
            continue
        if name in SCORE_OUTPUTS:
            out[name] = SLOPES.get(task, 0.5) * budget * scale(reference["logits"])
        else:
            out[name] = budget * scale(value)
    return out
