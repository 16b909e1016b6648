"""Probe heads on frozen encoder features: CGP, LCGP, LP, ProtoBin (the BAT paper's, as REF builds them),
Head2Toe and VQT (REF's `h2t` and `vqt` heads), their frame-wise versions for sound event detection
(`frame_head`), and the ASR head (BiLSTM for CTC). `HEADS` names every one of them (a probe file's `probe`).

Every head reads the same `Features` (the frozen encoder's per-layer CLS vectors and patch tokens) and
returns logits; `pool()` is the tensor entering the final Linear (what REF's golden `fc_input` holds).
Adding a probe is one small class: say which layers and which tokens it reads, write `pool()`.

Token layout: `Features.tokens` is (L, B, N, D) with N = T' x 8 in the encoder's time-major order
(token 8t + f is patch (t, f)), i.e. `encoder.forward_layers(spec)[:, :, 1:]`. REF's feature cache
holds the same numbers as patch_tokens (L, B, D, T', F'); `Features.from_ref` converts.

REF head state dicts load with `head_state_from_ref` (key names and the prototype shape differ). A head
names the parameters that take no weight decay in `no_decay` (bat.optim.param_groups reads it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from bat.precision import autocast

NORM_EPS = 1e-12  # F.normalize's eps, as REF uses it


class Features(NamedTuple):
    cls: torch.Tensor | None  # (L, B, D): every layer's CLS output (or only the last layer's)
    tokens: torch.Tensor | None  # (L, B, N, D): patch tokens, time-major
    time_patches: int  # T' (N = T' * 8)
    queries: torch.Tensor | None = None  # (L, B, Q, D): VQT query tokens' outputs

    @staticmethod
    def from_layers(layers, all_layers=True, cls=True, tokens=True):
        """From encoder.forward_layers output (L, B, 1 + N, D), keeping only what a head reads."""
        if not all_layers:
            layers = layers[-1:]
        n = layers.shape[2] - 1
        return Features(layers[:, :, 0] if cls else None, layers[:, :, 1:] if tokens else None, n // 8)

    @staticmethod
    def from_ref(patch_tokens, cls_tokens):
        """REF's feature cache: patch_tokens (L, B, D, T', F'), cls_tokens (L, B, D)."""
        L, B, D, T, Fq = patch_tokens.shape
        return Features(cls_tokens, patch_tokens.permute(0, 1, 3, 4, 2).reshape(L, B, T * Fq, D), T)

    def index(self, idx):
        """The rows `idx` of the batch (a feature cache draws training batches this way)."""
        pick = lambda t: None if t is None else t[:, idx]  # noqa: E731
        return Features(pick(self.cls), pick(self.tokens), self.time_patches, pick(self.queries))

    def to(self, device, dtype=None):
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype, non_blocking=True)  # noqa: E731
        return Features(move(self.cls), move(self.tokens), self.time_patches, move(self.queries))


@torch.no_grad()
def frozen_features(encoder, head, spec):
    """Spectrograms (B, 1, T, 128) -> the Features `head` reads, from one pass of a frozen encoder (all
    layers at once; bf16 autocast on CUDA)."""
    with autocast(spec.device, "cuda-bf16"):
        layers = encoder.forward_layers(spec)
    return Features.from_layers(layers, head.all_layers, head.reads_cls, head.reads_tokens)


def mix_normalised(x, gate):
    """sum_l gate_l * x_l / ||x_l|| over the layer axis 0 (normalised over the last axis).

    Folding the normalisation into the mixing weights keeps autograd from saving a normalised copy of
    all layers' tokens (L x B x N x D), the largest tensor of a CGP step. (A broadcast multiply and sum,
    not einsum: on CPU einsum turns this into B*N tiny matrix products run one by one.)"""
    w = gate.to(x.dtype).view(-1, *([1] * (x.dim() - 2))) / x.norm(dim=-1).clamp_min(NORM_EPS)
    return (w.unsqueeze(-1) * x).sum(0)


SIM_BLOCK = 1 << 21  # similarity entries per block on the CPU (8 MB in fp32: cache-sized pieces)


class _MinMaxSimilarity(torch.autograd.Function):
    """min and max over tokens of x (B, N, D) @ p.T (K, D) -> (B, K) each, with REF's gradient (to the
    winning token only).

    Autograd's backward of min/max scatters the gradient into a dense (B, N, K) zero tensor and runs two
    more full-size matmuls, although only 2 * B * K of its entries are non-zero; here the backward is two
    sparse matmuls with those entries. On the CPU the forward runs in cache-sized blocks of the batch, so
    the whole (B, N, K) tensor never exists. A cached CGP training step at probe_cgp.py's defaults (tiny,
    10.23 s, batch 48, 10,000 prototypes) took 2.34 s instead of 6.05 s on one AVX2 core."""

    @staticmethod
    def forward(ctx, x, p):
        B, N, _ = x.shape
        rows = B if x.is_cuda else max(1, SIM_BLOCK // (N * p.shape[0]))
        lo, hi = [], []
        for xb in x.split(rows):
            sim = torch.matmul(p, xb.transpose(1, 2))  # (b, K, N): N contiguous for the reductions
            lo.append(sim.min(-1))
            hi.append(sim.max(-1))
        (smin, imin), (smax, imax) = [[torch.cat(t) for t in zip(*r)] for r in (lo, hi)]
        ctx.save_for_backward(x, p, imin, imax)
        return smin, smax

    @staticmethod
    def backward(ctx, gmin, gmax):
        x, p, imin, imax = ctx.saved_tensors
        (B, N, D), K = x.shape, p.shape[0]
        token = torch.arange(B, device=x.device).unsqueeze(1) * N  # flat index of each clip's token 0
        rows = torch.cat([(token + imin).flatten(), (token + imax).flatten()])
        cols = torch.arange(K, device=x.device).repeat(2 * B)
        vals = torch.cat([gmin.flatten(), gmax.flatten()]).float()
        w = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (K, B * N), check_invariants=False).coalesce()
        gx = torch.sparse.mm(w.t(), p.float()).view(B, N, D).to(x.dtype) if ctx.needs_input_grad[0] else None
        gp = torch.sparse.mm(w, x.reshape(B * N, D).float()).to(p.dtype) if ctx.needs_input_grad[1] else None
        return gx, gp


def dense_min_max_similarity(x, p):
    """REF's formula as one plain graph: (B, N, K) similarities, then min and max over the tokens. What
    inference and ONNX export run; autograd's backward of it is the dense one."""
    sim = x @ p.T
    return sim.min(1).values, sim.max(1).values


def min_max_similarity(x, p):
    """(min, max) over the tokens of x (B, N, D) @ p.T, each (B, K); the sparse backward when training."""
    if torch.is_grad_enabled() and (x.requires_grad or p.requires_grad):
        return _MinMaxSimilarity.apply(x, p)
    return dense_min_max_similarity(x, p)


class Head(nn.Module):
    """Base class: dropout -> Linear on `pool(features)`. Subclasses set what they read."""

    kind = ""
    all_layers = True  # reads every layer (False: only the last)
    reads_cls = True
    reads_tokens = True
    no_decay = ()  # parameter names exempt from weight decay besides 1-D ones (REF: gate, prototypes)
    cacheable = True  # its features can be computed once, without gradients (not VQT)

    def __init__(self, in_features, num_classes, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def features(self, encoder, spec, export=False) -> Features:
        """What this head reads, from one pass of the (frozen) encoder over spec (B, 1, T, 128).
        export=True: the encoder's branch-free path (export.py's graph)."""
        layers = encoder.forward_layers(spec, export=export)
        return Features.from_layers(layers, self.all_layers, self.reads_cls, self.reads_tokens)

    def pool(self, f: Features) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, f: Features) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(f)))

    def gate_weights(self):
        """The convex layer weights (L,) for gated heads, else None."""
        return None

    def penalty(self):
        """A regulariser added to the training loss (Head2Toe's group lasso), else None."""
        return None

    def config(self):
        return dict(self._config)


def _frame_view(f: Features, x):
    """(..., N, K) -> (..., T', 8, K)."""
    return x.reshape(*x.shape[:-2], f.time_patches, x.shape[-2] // f.time_patches, x.shape[-1])


class CGP(Head):
    """Convex Gated Probing: softmax layer gate over L2-normalised layers, K normalised prototypes,
    [min, CLS, max] similarity pooling per prototype (or [min, mean, max] with use_cls=False), dropout,
    Linear(3K -> C). frame_wise: pool over the 8 frequency patches only -> logits (B, T', C)."""

    kind = "cgp"
    no_decay = ("gate_logits", "prototypes")

    def __init__(self, dim, num_layers, num_classes, num_prototypes=10000, use_cls=True, frame_wise=False,
                 dropout=0.2):
        super().__init__(3 * num_prototypes, num_classes, dropout)
        self._config = dict(dim=dim, num_layers=num_layers, num_classes=num_classes,
                            num_prototypes=num_prototypes, use_cls=use_cls, frame_wise=frame_wise, dropout=dropout)
        self.use_cls, self.frame_wise = use_cls and not frame_wise, frame_wise
        self.reads_cls = self.use_cls
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * 0.02)
        self.gate_logits = nn.Parameter(torch.ones(num_layers))  # equal logits: alpha = 1/L at the start

    def gate_weights(self):
        return self.gate_logits.softmax(0)

    def pool(self, f):
        a = self.gate_weights()
        p = F.normalize(self.prototypes, dim=1, eps=NORM_EPS).to(f.tokens.dtype)
        x = mix_normalised(f.tokens, a)  # (B, N, D)
        if self.frame_wise:
            sim = _frame_view(f, x @ p.T)  # (B, T', 8, K)
            feats = torch.stack([sim.min(2).values, sim.mean(2), sim.max(2).values], dim=-1)  # (B, T', K, 3)
            return feats.flatten(-2)  # interleaved per prototype, as REF
        mid = mix_normalised(f.cls, a) @ p.T if self.use_cls else (x.mean(1) @ p.T)  # mean of sims = sim of mean
        # min/max with indices (as REF): the gradient goes to the winning token only
        smin, smax = min_max_similarity(x, p)
        feats = torch.stack([smin, mid, smax], dim=-1)  # (B, K, 3)
        return feats.flatten(1)


class LCGP(Head):
    """Linear CGP: softmax-weighted sum of all layers' CLS (no L2 normalisation, as REF) -> LayerNorm ->
    dropout -> Linear. mode "patchavg": per-layer token mean instead of CLS; "frame": frequency mean
    per layer, keeps time."""

    kind = "lcgp"
    no_decay = ("gate_logits",)

    def __init__(self, dim, num_layers, num_classes, mode="cls", norm=True, dropout=0.2):
        super().__init__(dim, num_classes, dropout)
        self._config = dict(dim=dim, num_layers=num_layers, num_classes=num_classes, mode=mode, norm=norm,
                            dropout=dropout)
        self.mode = _check_mode(mode)
        self.reads_cls, self.reads_tokens = mode == "cls", mode != "cls"
        self.gate_logits = nn.Parameter(torch.zeros(num_layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()

    def gate_weights(self):
        return self.gate_logits.softmax(0)

    def pool(self, f):
        a = self.gate_weights()
        x = _summary(f, self.mode, all_layers=True)  # (L, B, D) or (L, B, T', D)
        return self.norm(torch.einsum("l,l...->...", a.to(x.dtype), x))


class LinearProbe(Head):
    """LP: the last layer's CLS -> LayerNorm -> dropout -> Linear (as REF; also the fine-tuning head).
    mode "patchavg" / "frame" as in LCGP."""

    kind = "lp"
    all_layers = False

    def __init__(self, dim, num_classes, mode="cls", norm=True, dropout=0.2):
        super().__init__(dim, num_classes, dropout)
        self._config = dict(dim=dim, num_classes=num_classes, mode=mode, norm=norm, dropout=dropout)
        self.mode = _check_mode(mode)
        self.reads_cls, self.reads_tokens = mode == "cls", mode != "cls"
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()

    def pool(self, f):
        return self.norm(_summary(f, self.mode, all_layers=False))


class ProtoBin(Head):
    """ProtoBin: last-layer patch tokens (L2-normalised) against K sign-binarised prototypes (straight-
    through gradient; 0 -> +1), max over tokens (frame_wise: over frequency patches) -> dropout -> Linear."""

    kind = "protobin"
    all_layers = False
    reads_cls = False
    no_decay = ("prototypes",)

    def __init__(self, dim, num_classes, num_prototypes=10000, frame_wise=False, dropout=0.2):
        super().__init__(num_prototypes, num_classes, dropout)
        self._config = dict(dim=dim, num_classes=num_classes, num_prototypes=num_prototypes,
                            frame_wise=frame_wise, dropout=dropout)
        self.frame_wise = frame_wise
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) * 0.02)

    def binary_prototypes(self):
        p = self.prototypes
        sign = (p >= 0).to(p.dtype) * 2 - 1
        return sign + (p - p.detach())  # forward: the sign; backward: identity (straight-through)

    def pool(self, f):
        x = F.normalize(f.tokens[-1], dim=-1, eps=NORM_EPS)
        p = F.normalize(self.binary_prototypes(), dim=1, eps=NORM_EPS).to(x.dtype)
        if self.frame_wise:
            return _frame_view(f, x @ p.T).max(2).values  # (B, T', K)
        return min_max_similarity(x, p)[1]  # max over tokens (the sparse backward; the min is a by-product)


class Head2Toe(Head):
    """Head2Toe (Evci et al., 2022) as REF: every layer's CLS concatenated (B, L*D), layer-major ->
    LayerNorm -> dropout -> Linear, trained with a group-lasso penalty that drives whole input features
    to zero: lasso_weight * sqrt(C) * sum_j ||W[:, j]||_2 (one group per input feature, REF's default).
    mode "patchavg": per-layer token mean; "frame": per-layer frequency mean, keeps time."""

    kind = "h2t"

    def __init__(self, dim, num_layers, num_classes, mode="cls", norm=True, dropout=0.2, lasso_weight=1e-4):
        super().__init__(dim * num_layers, num_classes, dropout)
        self._config = dict(dim=dim, num_layers=num_layers, num_classes=num_classes, mode=mode, norm=norm,
                            dropout=dropout, lasso_weight=lasso_weight)
        self.mode, self.lasso_weight = _check_mode(mode), lasso_weight
        self.reads_cls, self.reads_tokens = mode == "cls", mode != "cls"
        self.norm = nn.LayerNorm(dim * num_layers, eps=1e-6) if norm else nn.Identity()

    def pool(self, f):
        x = _summary(f, self.mode, all_layers=True)  # (L, B, D) or (L, B, T', D)
        return self.norm(torch.movedim(x, 0, -2).flatten(-2))  # (B, L*D) or (B, T', L*D)

    def penalty(self):
        if not self.lasso_weight:
            return None
        scale = math.sqrt(self.fc.out_features)  # REF's group_scale = sqrt(group size = classes)
        return self.lasso_weight * scale * torch.linalg.vector_norm(self.fc.weight, dim=0).sum()


class VQT(Head):
    """Visual Query Tuning (Tu et al., 2023) as REF: Q learned query tokens per block enter next to the
    frozen sequence, read it through the block (attention, gate, MLP) without being read by it, and
    leave. The head sees [last block's CLS, every block's Q query outputs] L2-normalised (the CLS over D,
    each block's queries over Q*D) -> LayerNorm -> Linear. Queries are averaged over 10 s chunks.

    The queries must run through the encoder's blocks, so `features()` calls the encoder with them and
    the training step needs gradients through that call (no feature cache). REF's ViT VQT head has no
    dropout (its BEATs one has head_dropout); dropout defaults to 0."""

    kind = "vqt"
    reads_tokens = False
    cacheable = False
    no_decay = ("queries",)

    def __init__(self, dim, num_layers, num_classes, num_queries=10, norm=True, dropout=0.0, norm_eps=1e-6):
        super().__init__(dim + num_layers * num_queries * dim, num_classes, dropout)
        self._config = dict(dim=dim, num_layers=num_layers, num_classes=num_classes, num_queries=num_queries,
                            norm=norm, dropout=dropout, norm_eps=norm_eps)
        bound = math.sqrt(6.0 / (3 * 16 * 16 + dim))  # REF: xavier-style bound from the 16x16 patch area
        self.queries = nn.Parameter(torch.empty(num_layers, num_queries, dim).uniform_(-bound, bound))
        self.norm = nn.LayerNorm(dim + num_layers * num_queries * dim, eps=norm_eps) if norm else nn.Identity()

    def features(self, encoder, spec, export=False):
        layers, queries = encoder.forward_layers(spec, export=export, queries=self.queries)
        return Features(layers[-1:, :, 0], None, (layers.shape[2] - 1) // 8, queries)

    def head_input(self, f):
        """[CLS, queries] normalised, before the LayerNorm (REF's extract_vqt_features)."""
        cls = F.normalize(f.cls[-1], dim=-1, eps=NORM_EPS)  # (B, D)
        q = F.normalize(f.queries.flatten(2), dim=-1, eps=NORM_EPS)  # (L, B, Q*D)
        return torch.cat([cls, q.transpose(0, 1).flatten(1)], dim=1)

    def pool(self, f):
        return self.norm(self.head_input(f))


def _check_mode(mode):
    if mode not in ("cls", "patchavg", "frame"):
        raise ValueError(f"unknown head mode {mode!r}; one of cls, patchavg, frame")
    return mode


def _summary(f, mode, all_layers):
    """One vector per layer (and frame): CLS, token mean, or frequency mean keeping time."""
    if mode == "cls":
        x = f.cls
    elif mode == "patchavg":
        x = f.tokens.mean(2)
    else:
        x = _frame_view(f, f.tokens).mean(3)  # (L, B, T', D)
    return x if all_layers else x[-1]


# ---------------------------------------------------------------------------------------------
# The ASR head (bat.asr: text, data and scoring)

CHARS = ("<blank>", " ", "'") + tuple(chr(c) for c in range(ord("a"), ord("z") + 1))  # the CTC symbols, 0 = blank
STEPS_PER_PATCH = 8  # 160 ms patch -> 8 x 20 ms


class ASRHead(Head):
    """REF's ASR head on the frozen encoder's patch tokens -> log-probabilities (B, 8 T', 29)."""

    kind = "asr"
    reads_cls = False
    no_decay = ("gate_logits",)

    def __init__(self, dim, num_layers, num_classes=len(CHARS), hidden=512, norm=True, dropout=0.2):
        super().__init__(2 * hidden, num_classes, dropout)
        self._config = dict(dim=dim, num_layers=num_layers, num_classes=num_classes, hidden=hidden, norm=norm,
                            dropout=dropout)
        self.gate_logits = nn.Parameter(torch.ones(num_layers))  # REF: ones, so a uniform mix at the start
        self.upsample = nn.ConvTranspose1d(dim, dim, kernel_size=STEPS_PER_PATCH, stride=STEPS_PER_PATCH)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True, bidirectional=True, dropout=0.2)
        self.norm = nn.LayerNorm(2 * hidden, eps=1e-6) if norm else nn.Identity()

    def gate_weights(self):
        return self.gate_logits.softmax(0)

    def pool(self, f: Features):
        a = self.gate_weights().to(f.tokens.dtype)
        x = torch.einsum("l,l...->...", a, _frame_view(f, f.tokens).mean(3))  # (B, T', D)
        x = self.upsample(x.transpose(1, 2)).transpose(1, 2)  # (B, 8 T', D)
        with torch.autocast(x.device.type, enabled=False):  # the LSTM runs in float32, as in REF
            x, _ = self.lstm(x.float())
        return self.norm(x)

    def forward(self, f: Features):
        return F.log_softmax(self.fc(self.dropout(self.pool(f))).float(), dim=-1)


# ---------------------------------------------------------------------------------------------
# Every head, and the ones the probe script builds from its flags

HEADS = {"cgp": CGP, "lcgp": LCGP, "lp": LinearProbe, "protobin": ProtoBin, "h2t": Head2Toe, "vqt": VQT,
         "asr": ASRHead}


def build_head(kind, dim, num_layers, num_classes, prototypes=10000, dropout=0.2, use_cls=True, mode="cls",
               lasso_weight=1e-4, num_queries=10, norm=True):
    """The head the probe script trains, from its flags (REF's configs: Head2Toe lasso 1e-4, VQT 10
    queries per block). `norm`: the LayerNorm before the Linear of LP, LCGP, Head2Toe and VQT."""
    if kind == "h2t":
        return Head2Toe(dim, num_layers, num_classes, mode=mode, norm=norm, dropout=dropout, lasso_weight=lasso_weight)
    if kind == "vqt":
        return VQT(dim, num_layers, num_classes, num_queries=num_queries, norm=norm)
    if kind == "cgp":
        return CGP(dim, num_layers, num_classes, prototypes, use_cls=use_cls, dropout=dropout)
    if kind == "lcgp":
        return LCGP(dim, num_layers, num_classes, mode=mode, norm=norm, dropout=dropout)
    if kind == "lp":
        return LinearProbe(dim, num_classes, mode=mode, norm=norm, dropout=dropout)
    if kind == "protobin":
        return ProtoBin(dim, num_classes, prototypes, dropout=dropout)
    raise ValueError(f"unknown probe {kind!r}; one of cgp, lcgp, lp, protobin, h2t, vqt")


def head_state_from_ref(state):
    """Convert a REF head state dict (models/heads.py; keys as stored under `head.` in a REF ViT, with or
    without that prefix) to this module's names:

        prototype_vectors (K, D, 1, 1) -> prototypes (K, D)
        block_attention   (L,)         -> gate_logits (L,)      (CGP and LCGP)
        ln.weight / ln.bias            -> norm.weight / norm.bias (LCGP, LP with head_norm)
        fc.weight / fc.bias            -> fc.weight / fc.bias

    Head2Toe's `group_scale` buffer is dropped (it only scales a training penalty)."""
    out = {}
    for k, v in state.items():
        k = k[len("head."):] if k.startswith("head.") else k
        if k == "prototype_vectors":
            out["prototypes"] = v.reshape(v.shape[0], v.shape[1])
        elif k == "block_attention":
            out["gate_logits"] = v
        elif k.startswith("ln."):
            out["norm." + k[3:]] = v
        elif k.startswith("fc."):
            out[k] = v
        elif k != "group_scale":
            raise KeyError(f"unexpected REF head key {k!r}")
    return out


def frame_head(kind, dim, num_layers, num_classes, prototypes=10000, dropout=0.2):
    """The frame-wise version of each probe, as REF's configs/dcase2016_task2: CGP pools [min, mean, max]
    over the 8 frequency patches of each time patch; LCGP and LP average them (after the layer mix) and
    apply a LayerNorm; ProtoBin takes the max over them."""
    if kind == "cgp":
        return CGP(dim, num_layers, num_classes, prototypes, frame_wise=True, dropout=dropout)
    if kind == "lcgp":
        return LCGP(dim, num_layers, num_classes, mode="frame", norm=True, dropout=dropout)
    if kind == "lp":
        return LinearProbe(dim, num_classes, mode="frame", norm=True, dropout=dropout)
    if kind == "protobin":
        return ProtoBin(dim, num_classes, prototypes, frame_wise=True, dropout=dropout)
    raise ValueError(f"no frame-wise {kind!r} probe; one of cgp, lcgp, lp, protobin")
