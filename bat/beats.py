"""BEATs (Chen et al., ICML 2023) as a frozen encoder of this project, for probing next to BAT/EAT/SSLAM.

The blocks follow the BAT reference implementation's `models/beats.py` (REF,
github.com/houtan-ghaffari/BAT_ICML2026, itself adapted from microsoft/unilm `beats/BEATs.py`):

- patch embedding: Conv2d(1, 512, 16, stride 16, no bias) on the Kaldi fbank (B, 1, T, 128), tokens in
  time-major order (token 8t + f), LayerNorm(512), Linear(512 -> 768);
- convolutional positions: a grouped Conv1d over the token sequence (kernel 128, 16 groups, weight norm
  over the kernel axis), the last output dropped ("same" padding), GELU, added to the tokens, LayerNorm;
- post-LN "deep-norm" blocks: x = LN(alpha * x + Attn(x)), x = LN(alpha * x + FFN(x)), alpha = (2L)^(1/4);
- attention with a T5-style bucketed relative position bias (320 buckets, max distance 800) shared by
  all blocks and scaled per query by a gated-relative-position gate (`grep_linear`, `grep_a`).

Inputs longer than 64 time patches (10.24 s) are encoded in chunks of 64, as REF does.

BEATs has no CLS token. `forward_layers` keeps this project's contract (L, B, 1 + N, D) and puts in
slot 0 what REF uses wherever a head asks for a CLS: the mean of the chunk's patch tokens, averaged over
chunks. LP / LCGP / Head2Toe thus read the patch mean; CGP must pool [min, mean, max] (`has_cls` is
False, and the probe script switches CGP to that).

Key names are Microsoft's (and REF's), so a released checkpoint's `model` dict loads as it is (bat.checkpoint
reads Microsoft's checkpoint files: `load_beats_checkpoint`). This file is the architecture only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH = 16
FREQ_PATCHES = 8
BEATS_FRONTEND = {"kind": "beats", "dataset": "audioset"}


@dataclass
class BeatsConfig:
    """Field names follow the `cfg` dict stored in Microsoft's BEATs checkpoints where they exist."""

    arch: str = "beats"  # tells saved configs apart from the BAT encoder's
    dim: int = 768  # encoder_embed_dim
    depth: int = 12  # encoder_layers
    num_heads: int = 12  # encoder_attention_heads
    ffn_dim: int = 3072  # encoder_ffn_embed_dim
    embed_dim: int = 512  # patch embedding width before post_extract_proj
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    deep_norm: bool = True
    chunk_patches: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint_cfg(cls, cfg: dict) -> "BeatsConfig":
        """From Microsoft's checkpoint `cfg`; the rest of REF's setting (post-LN, GELU) is checked."""
        if cfg.get("layer_norm_first", False) or cfg.get("activation_fn", "gelu") != "gelu":
            raise ValueError("only post-LN GELU BEATs (layer_norm_first=False, as iter1-iter3+) is supported")
        if not cfg.get("relative_position_embedding", True):
            raise ValueError("BEATs without relative position embedding is not supported")
        names = dict(dim="encoder_embed_dim", depth="encoder_layers", num_heads="encoder_attention_heads",
                     ffn_dim="encoder_ffn_embed_dim", embed_dim="embed_dim", conv_pos="conv_pos",
                     conv_pos_groups="conv_pos_groups", num_buckets="num_buckets", max_distance="max_distance",
                     gru_rel_pos="gru_rel_pos", deep_norm="deep_norm")
        return cls(**{ours: cfg[theirs] for ours, theirs in names.items() if theirs in cfg})


def relative_position_bucket(rel, num_buckets, max_distance):
    """T5 buckets, bidirectional: exact up to a quarter of the buckets, logarithmic beyond (REF's ops)."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(rel < exact, rel, large)


class BeatsAttention(nn.Module):
    def __init__(self, cfg: BeatsConfig, has_bias_table: bool):
        super().__init__()
        d, self.num_heads = cfg.dim, cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.q_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, cfg.num_heads, 1, 1))
        # One table for all blocks (REF shares block 0's): only block 0 owns it.
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads) if has_bias_table else None

    def forward(self, x, pos_bias, context=None, key_mask=None):
        """x (B, Tq, D) attends to context (B, Tk, D) (itself if None); pos_bias (H, Tq, Tk); key_mask
        (B, Tk), True = attend (the zero padding of a ragged last chunk is not)."""
        kv = x if context is None else context
        B, Tq, D = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv))
        bias = pos_bias.to(q.dtype)
        if self.gru_rel_pos:  # per-query, per-head scale of the position bias, from the unscaled query
            gate_a, gate_b = self.grep_linear(q).view(B, self.num_heads, Tq, 2, 4).sum(-1).sigmoid().chunk(2, dim=-1)
            bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias  # (B, H, Tq, Tk)
        if key_mask is not None:
            bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        if torch.compiler.is_exporting():
            # The same numbers without SDPA: its output layout on a chunk length the tracer cannot bound
            # (no CLS token here) blocks the reshape below when export.py traces the graph.
            a = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(a.transpose(1, 2).reshape(B, Tq, D))


class BeatsLayer(nn.Module):
    """Post-LN deep-norm block (REF TransformerSentenceEncoderLayer with layer_norm_first=False)."""

    def __init__(self, cfg: BeatsConfig, has_bias_table: bool):
        super().__init__()
        self.self_attn = BeatsAttention(cfg, has_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.alpha = math.pow(2 * cfg.depth, 1 / 4) if cfg.deep_norm else 1.0

    def forward(self, x, pos_bias, context=None, key_mask=None):
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, pos_bias, context, key_mask))
        h = self.fc2(F.gelu(self.fc1(x).float()).type_as(x))  # GELU in float32, as REF
        return self.final_layer_norm(x * self.alpha + h)


class PosConv(nn.Module):
    """Grouped Conv1d with weight norm over the kernel axis (torch weight_norm(dim=2) key names)."""

    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        d, k = cfg.dim, cfg.conv_pos
        self.weight_g = nn.Parameter(torch.ones(1, 1, k))
        self.weight_v = nn.Parameter(torch.randn(d, d // cfg.conv_pos_groups, k) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d))
        self.groups, self.k = cfg.conv_pos_groups, k

    def forward(self, x):
        """x (B, N, D) -> (B, N, D): conv over tokens, last output dropped for even kernels, GELU."""
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        y = F.conv1d(x.transpose(1, 2), w.to(x.dtype), self.bias.to(x.dtype), padding=self.k // 2, groups=self.groups)
        if self.k % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)


class BeatsTransformer(nn.Module):
    def __init__(self, cfg: BeatsConfig):
        super().__init__()
        self.pos_conv = nn.ModuleList([PosConv(cfg)])  # REF: Sequential(conv, SamePad, GELU) -> key pos_conv.0.*
        self.layer_norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList(BeatsLayer(cfg, has_bias_table=i == 0) for i in range(cfg.depth))
        self.cfg = cfg

    def position_bias(self, q_pos, k_pos):
        """(H, Tq, Tk) bias for query positions q_pos and key positions k_pos."""
        table = self.layers[0].self_attn.relative_attention_bias
        bucket = relative_position_bucket(k_pos[None, :] - q_pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        # weight[bucket], not table(bucket): an exported embedding op's value is named "embedding" and
        # would clash with the ONNX graph output of that name
        return table.weight[bucket.to(table.weight.device)].permute(2, 0, 1)

    def forward(self, x, queries=None, key_mask=None):
        """x (B, n, D) one chunk of tokens -> (L, B, n, D) every layer's output, and with queries (L, Q, D)
        also the query tokens' outputs (L, B, Q, D).

        VQT (REF): block l's Q query tokens sit in front of the sequence (positions 0..Q-1, the patches
        after them), attend to the patch tokens only and are dropped after the block: the patch stream is
        the same with or without them, so it is computed once, and each block is run again for the
        queries alone with the block's input as context. key_mask (B, n): False for padding tokens, which
        must be zeros (the position convolution then sees what its own zero padding would give)."""
        x = self.layer_norm(x + self.pos_conv[0](x))
        n, dev = x.shape[1], x.device
        pos = torch.arange(n, device=dev)
        bias = self.position_bias(pos, pos)
        outs, q_outs = [], []
        if queries is not None:
            nq = queries.shape[1]
            q_bias = self.position_bias(torch.arange(nq, device=dev), pos + nq)
        for i, layer in enumerate(self.layers):
            if queries is not None:
                q = queries[i].to(x.dtype).expand(x.shape[0], -1, -1)
                q_outs.append(layer(q, q_bias, context=x, key_mask=key_mask))
            x = layer(x, bias, key_mask=key_mask)
            outs.append(x)
        return torch.stack(outs), (torch.stack(q_outs) if queries is not None else None)


class BEATs(nn.Module):
    """BEATs encoder: forward_layers(spec (B, 1, T, 128)) -> (L, B, 1 + N, D), slot 0 = patch mean."""

    has_cls = False  # slot 0 of forward_layers is the patch mean (CGP pools [min, mean, max])

    def __init__(self, cfg: BeatsConfig | None = None, **kwargs):
        super().__init__()
        cfg = cfg or BeatsConfig(**kwargs)
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=PATCH, stride=PATCH, bias=False)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.dim) if cfg.embed_dim != cfg.dim else None
        self.encoder = BeatsTransformer(cfg)
        self.frontend_config = dict(BEATS_FRONTEND)

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def embed(self, spec):
        """(B, 1, T, 128) -> (B, N, D) time-major tokens (frames beyond a multiple of 16 dropped)."""
        x = self.layer_norm(self.patch_embedding(spec).flatten(2).transpose(1, 2))
        return self.post_extract_proj(x) if self.post_extract_proj is not None else x

    def forward_layers(self, spec, export=False, queries=None):
        """(B, 1, T, 128) -> (L, B, 1 + N, D); with queries (L, Q, D) (VQT) also (L, B, Q, D).

        Chunks of chunk_patches time patches are encoded on their own (REF: torch.split), batched
        together: a ragged last chunk is zero-padded and its padding masked out of attention and of the
        chunk's token mean, which gives REF's numbers. Slot 0 and the query outputs are averaged over
        chunks, each chunk counting once (as REF). export=True (export.py): no Python branch on the
        input length, as in bat.model.Encoder."""
        x = self.embed(spec)
        B, N, D = x.shape
        tp = N // FREQ_PATCHES
        if not export and tp <= self.cfg.chunk_patches:  # one chunk: nothing to pad or mask
            layers, q = self.encoder(x, queries)
            out = torch.cat([layers.mean(2, keepdim=True), layers], dim=2)
            return out if queries is None else (out, q)
        chunk = torch.sym_min(tp, self.cfg.chunk_patches)
        n_chunks = (tp + chunk - 1) // chunk
        pad_tokens = (n_chunks * chunk - tp) * FREQ_PATCHES
        L = chunk * FREQ_PATCHES
        x = F.pad(x, (0, 0, 0, pad_tokens)).reshape(B * n_chunks, L, D)
        valid = (torch.arange(n_chunks * L, device=x.device) < N).reshape(1, n_chunks, L).expand(B, -1, -1)
        valid = valid.reshape(B * n_chunks, L)
        layers, q = self.encoder(x, queries, valid if export or pad_tokens else None)  # (layers, B*C, L, D)
        w = valid.to(layers.dtype)[None, :, :, None]
        means = (layers * w).sum(2) / w.sum(2)  # (layers, B*C, D): each chunk's mean over its own tokens
        mean = means.reshape(-1, B, n_chunks, D).mean(2, keepdim=True)
        tokens = layers.reshape(-1, B, n_chunks * L, D)[:, :, :N]
        out = torch.cat([mean, tokens], dim=2)
        if queries is None:
            return out
        return out, q.reshape(q.shape[0], B, n_chunks, -1, D).mean(2)

    def forward(self, spec):
        return self.forward_layers(spec)[-1]
