"""The BAT encoder (gated post-LN ViT) and the pretraining decoder, in one file.

Layout and key names follow the reference implementation (REF) so its state dicts load as they are:
`pos_embed`, `cls_token`, `patch_embed.proj`, `pre_norm`, `blocks.{i}.{norm1,attn.{qkv,gate,proj},norm2,mlp.{fc1,fc2}}`.
Spectrogram input is (B, 1, T, 128): T frames of 10 ms, 128 mel bins; patches are 16x16.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PATCH = 16
MEL_BINS = 128
FREQ_PATCHES = MEL_BINS // PATCH  # 8


@dataclass
class EncoderConfig:
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    gated: bool = True
    # Time patches per chunk = width of the positional grid (64 patches = 10.24 s). Longer inputs are
    # encoded in chunks of this many time patches, as REF does. REF pretrains with the grid of its input.
    chunk_patches: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


# tiny is this project's CPU-sized model: 192 wide, 6 blocks, 3 heads of 64 (~2.9 M parameters with
# gates). It keeps the head width of base/small so the same attention kernels are exercised.
SIZES = {
    "tiny": dict(dim=192, depth=6, num_heads=3),
    "small": dict(dim=384, depth=12, num_heads=6),
    "base": dict(dim=768, depth=12, num_heads=12),
}


def config_for(size: str, **overrides) -> EncoderConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return EncoderConfig(**{**SIZES[size], **overrides})


def sincos_table(dim: int, time_patches: int, freq_patches: int = FREQ_PATCHES) -> torch.Tensor:
    """REF's fixed 2-D sin-cos table for a (freq_patches rows x time_patches columns) grid, (rows*cols, dim).

    Row r encodes column r % time_patches in the first dim/2 channels and row r // time_patches in the
    last dim/2 (MAE's get_2d_sincos_pos_embed on a frequency-major grid). Tokens are time-major
    (token 8t+f) but get row i of this table *by flat index*: the two orders do not match. That is a
    quirk of REF, and every BAT checkpoint was trained with it, so we keep it.
    """
    assert dim % 4 == 0, "sin-cos table needs dim divisible by 4"
    r = torch.arange(freq_patches * time_patches, dtype=torch.float64)
    col, row = r % time_patches, torch.div(r, time_patches, rounding_mode="floor")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos):
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        # (B, 1, T, 128) -> (B, D, T/16, 8) -> (B, T/16 * 8, D): time-major, token index = 8t + f.
        # Frames beyond a multiple of 16 are dropped by the stride, as in REF.
        return self.proj(spec).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with an optional sigmoid gate computed from the block input.

    The gate (BAT) lets every channel of every token scale down what attention writes into it,
    which the paper found to help the probe-ability of intermediate layers. EAT/SSLAM have no gate.
    """

    def __init__(self, dim: int, num_heads: int, gated: bool = True):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.gate = nn.Linear(dim, dim) if gated else None
        self.proj = nn.Linear(dim, dim)
        # Set to True only by benchmarks: the explicit-softmax path REF uses, to measure SDPA's gain.
        self.explicit_softmax = False

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """context: keys and values come from it instead of x (VQT's query tokens read the sequence)."""
        B, N, D = x.shape
        if context is None:
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:D], b[:D]).view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)
            k, v = F.linear(context, w[D:], b[D:]).view(B, -1, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, N), True = attend
        if self.explicit_softmax:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            a = scores.softmax(dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, N, D)
        if self.gate is not None:
            a = torch.sigmoid(self.gate(x)) * a
        return self.proj(a)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per example (fine-tuning only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Post-LN block (data2vec 2.0 / EAT style): x = LN1(x + Attn(x)); x = LN2(x + MLP(x)).

    Post-LN keeps every block output on the same scale, which matters twice here: the teacher's
    end-of-block outputs are the regression targets, and CGP mixes all blocks' outputs.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, gated: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, num_heads, gated)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + drop_path(self.attn(x, key_mask, context), self.drop_path, self.training))
        return self.norm2(x + drop_path(self.mlp(x), self.drop_path, self.training))


class Encoder(nn.Module):
    """The BAT encoder. `forward_layers(spec)` -> (L, B, 1 + N, D), every block's output, CLS first."""

    def __init__(self, cfg: EncoderConfig | None = None, drop_path: float = 0.0, **kwargs):
        super().__init__()
        cfg = cfg or EncoderConfig(**kwargs)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.dim)
        # Fixed, not trained; kept in the state dict under REF's name so checkpoints line up.
        self.register_buffer("pos_embed", sincos_table(cfg.dim, cfg.chunk_patches)[None])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        dpr = [drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear over depth
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.gated, dpr[i]) for i in range(cfg.depth)
        )
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def init_pretraining_weights(self):
        """REF's pretraining init: xavier-uniform Linear weights (gates too), zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def _run_blocks(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, queries: torch.Tensor | None = None):
        """CLS in front, pre_norm, every block. Returns (L, B, 1 + N, D); with queries (L, Q, D) also
        the query tokens' outputs (L, B, Q, D).

        VQT (REF): block l's query tokens enter next to the sequence, attend to it but are not attended
        to (REF drops them from keys and values) and are discarded after the block. So the sequence is
        the same with or without them: we run it once and run each block again on the queries alone,
        with the block's input as context (no gradient flows through the frozen sequence)."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x)
        if key_mask is not None:
            key_mask = F.pad(key_mask, (1, 0), value=True)  # CLS is always attended
        outs, q_outs = [], []
        for i, blk in enumerate(self.blocks):
            if queries is not None:
                q_outs.append(blk(queries[i].to(x.dtype).expand(x.shape[0], -1, -1), key_mask, context=x))
            x = blk(x, key_mask)
            outs.append(x)
        return torch.stack(outs) if queries is None else (torch.stack(outs), torch.stack(q_outs))

    def forward_layers(self, spec: torch.Tensor, export: bool = False, queries: torch.Tensor | None = None):
        """(B, 1, T, 128) -> (L, B, 1 + N, D) with N = 8 * (T // 16). With VQT query tokens `queries`
        (L, Q, D) it returns (layers, query outputs (L, B, Q, D), averaged over chunks as REF).

        Inputs longer than `chunk_patches` time patches are cut into consecutive chunks, each encoded
        on its own with its own CLS and positions restarting at row 0 (as REF). The chunk CLS outputs
        are averaged, patch tokens concatenated. Chunks are batched together: the ragged last chunk is
        zero-padded and its padding excluded from attention by a key mask, which gives the same numbers
        as encoding it alone (LayerNorm and MLP are per token) without a Python loop over chunks.

        export=True (export.py): no Python branch on the input length, so torch.export can keep the
        time axis dynamic. A short input is then one chunk of its own length (chunk = min(T', 64) as a
        symbolic min) and the key mask is always applied (all True when nothing is padded): the same
        numbers. Eager code leaves it False: without a mask SDPA may pick its fastest kernel.
        """
        x = self.patch_embed(spec)
        B, N, D = x.shape
        tp = N // FREQ_PATCHES  # time patches
        if not export and tp <= self.cfg.chunk_patches:
            return self._run_blocks(x + self.pos_embed[:, :N].to(x.dtype), queries=queries)
        chunk = torch.sym_min(tp, self.cfg.chunk_patches)
        n_chunks = (tp + chunk - 1) // chunk  # ceil without negative floor division: ONNX Div truncates
        pad_tokens = (n_chunks * chunk - tp) * FREQ_PATCHES
        L = chunk * FREQ_PATCHES
        x = F.pad(x, (0, 0, 0, pad_tokens)).reshape(B * n_chunks, L, D) + self.pos_embed[:, :L].to(x.dtype)
        valid = torch.arange(n_chunks * L, device=x.device) < N
        key_mask = valid.reshape(1, n_chunks, L).expand(B, -1, -1).reshape(B * n_chunks, L)
        out = self._run_blocks(x, key_mask if export or pad_tokens else None, queries)  # (layers, B*C, 1+L, D)
        out, q_out = (out, None) if queries is None else out
        out = out.reshape(out.shape[0], B, n_chunks, 1 + L, D)
        cls = out[:, :, :, 0].mean(dim=2, keepdim=True)  # (layers, B, 1, D)
        patches = out[:, :, :, 1:].reshape(out.shape[0], B, n_chunks * L, D)[:, :, :N]
        out = torch.cat([cls, patches], dim=2)
        return out if queries is None else (out, q_out.reshape(q_out.shape[0], B, n_chunks, -1, D).mean(2))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """Last block's output, (B, 1 + N, D)."""
        return self.forward_layers(spec)[-1]

    def forward_masked(self, spec: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pretraining student: encode only the kept patches. ids_keep (B, K) sorted token indices.

        Returns (CLS output (B, D), kept patch outputs (B, K, D)). The input must fit one chunk.
        """
        x = self.patch_embed(spec)
        x = x + self.pos_embed[:, : x.shape[1]].to(x.dtype)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        out = self._run_blocks(x)[-1]
        return out[:, 0], out[:, 1:]


class Decoder(nn.Module):
    """BAT's ViT decoder for masked latent regression (replaces EAT's CNN decoder).

    Kept-token outputs of the student are written into a sequence of learned mask tokens at their
    positions, a trainable positional table is added, and gated post-LN blocks predict the teacher's
    target for every position.
    """

    def __init__(self, enc_dim: int, dim: int = 768, depth: int = 6, num_heads: int = 12,
                 mlp_ratio: float = 4.0, num_patches: int = 512, time_patches: int = 64):
        super().__init__()
        self.in_proj = nn.Linear(enc_dim, dim, bias=False) if dim != enc_dim else nn.Identity()  # REF: no bias
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_table(dim, time_patches)[None, :num_patches].clone())
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, gated=True) for _ in range(depth))
        self.out_proj = nn.Linear(dim, enc_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, kept: torch.Tensor, ids_keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """kept (B, K, enc_dim), ids_keep (B, K) -> predictions (B, num_patches, enc_dim)."""
        kept = self.in_proj(kept)
        B, K, D = kept.shape
        x = self.mask_token.to(kept.dtype).expand(B, num_patches, D)
        x = x.scatter(1, ids_keep[..., None].expand(-1, -1, D), kept)
        x = x + self.pos_embed[:, :num_patches].to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.out_proj(x)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@contextmanager
def eval_mode(*modules: nn.Module):
    """Run `modules` in eval mode (no dropout, no drop-path) and give every submodule its own mode back
    afterwards, errors included. Scoring helpers are handed modules that may be training (a fine-tuning run's
    model between steps) or not (a loaded probe); neither should come back changed."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
