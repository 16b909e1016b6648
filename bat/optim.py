"""Optimisation shared by the training scripts: REF's schedules and AdamW parameter groups.

- `lr_at` / `set_lr`: REF's warm-up + cosine learning rate (RiseRunDecay), value for value;
- `EmaSchedule` (REF's EMA_Scheduler) and `ema_update`: the teacher's exponential moving average;
- `param_groups` (no weight decay on biases, norms and tokens) and `param_groups_lrd` (REF's layer-wise
  LR decay for fine-tuning).
"""
from __future__ import annotations

import math

import numpy as np
import torch

# ------------------------------------------------------------------------------------- schedules


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 1e-6, lr_scale: float = 1.0,
          constant: int = 0) -> float:
    """Learning rate that optimiser step `step` (0-based) uses: REF's RiseRunDecay.

    factor = step / warmup up to `warmup` (so step 0 trains at min_lr), 1 for `constant` more steps,
    then a half cosine from 1 to 0 at `total`; lr = max(min_lr * lr_scale, peak * factor * lr_scale).
    The floor is scaled by the group's lr_scale too, as in REF. Past `total` the factor stays 0
    (REF's cosine would rise again; no REF run goes there).
    """
    plateau_end = warmup + constant
    if warmup > 0 and step <= warmup:
        factor = step / warmup
    elif step <= plateau_end:
        factor = 1.0
    elif total <= plateau_end:
        factor = 0.0
    else:
        factor = 0.5 * (1 + math.cos(math.pi * min(step - plateau_end, total - plateau_end) / (total - plateau_end)))
    return max(min_lr * lr_scale, peak * factor * lr_scale)


def set_lr(optimizer: torch.optim.Optimizer, step: int, peak: float, warmup: int, total: int,
           min_lr: float = 1e-6) -> float:
    """Set every group's lr for optimiser step `step` (each scaled by its `lr_scale`); returns the
    unscaled value (the lr of a scale-1 group)."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, peak, warmup, total, min_lr, g.get("lr_scale", 1.0))
    return lr_at(step, peak, warmup, total, min_lr)


class EmaSchedule:
    """REF's EMA_Scheduler: decay used by the EMA update after optimiser step k (0-based).

    A table of `anneal_steps` values evenly spaced from start to end, computed in float32 (so the
    first value is float32(0.9998) = 0.9998000264167786, and many neighbours are equal), then `end`
    itself from step anneal_steps on. Kept as REF computes it: the teacher is sensitive to the
    decay (1 - decay is tiny), and reproducing REF runs needs the same numbers.
    """

    def __init__(self, start: float = 0.9998, end: float = 0.99999, anneal_steps: int = 100_000):
        self.table = np.linspace(start, end, anneal_steps, dtype=np.float32).tolist() + [end]
        self.anneal_steps = anneal_steps

    def __call__(self, k: int) -> float:
        return float(self.table[min(max(k, 0), self.anneal_steps)])


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, for parameters and float buffers.

    One fused lerp per tensor list (no Python arithmetic per element). lerp leaves equal tensors
    exactly equal, so fixed buffers (the sin-cos table) never drift by rounding over 400 k steps.
    """
    t = list(teacher.parameters()) + [b for b in teacher.buffers() if b.is_floating_point()]
    s = list(student.parameters()) + [b for b in student.buffers() if b.is_floating_point()]
    if len(t) != len(s):
        raise ValueError(f"teacher and student differ in structure ({len(t)} vs {len(s)} tensors)")
    torch._foreach_lerp_(t, [x.detach() for x in s], 1.0 - decay)


# ----------------------------------------------------------------------------- parameter groups


def _is_no_decay(name: str, p: torch.Tensor, extra: tuple[str, ...]) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in extra


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay_names: tuple[str, ...] = ("cls_token", "mask_token", "pos_embed")) -> list[dict]:
    """Two AdamW groups: with weight decay (matrices, conv kernels) and without (every 1-D parameter,
    i.e. biases and LayerNorm weights, the learned tokens/tables named in no_decay_names, and those the
    module names in its own `no_decay`: a probe head's gate logits, prototypes or queries, as REF).

    Decaying a LayerNorm gain or a bias towards 0 only fights the normalisation; this is the usual
    MAE / timm practice. Each group lists its parameter names (for tests and inspection).
    """
    exempt = tuple(no_decay_names) + tuple(getattr(model, "no_decay", ()))
    decay, no_decay = {"params": [], "names": [], "weight_decay": weight_decay}, \
        {"params": [], "names": [], "weight_decay": 0.0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = no_decay if _is_no_decay(name, p, exempt) else decay
            g["params"].append(p)
            g["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def layer_id(name: str, depth: int) -> int:
    """REF's get_layer_id_for_vit: 0 for cls_token / pos_embed / patch_embed, i + 1 for blocks.i, and
    depth + 1 for everything else (the head, and also the encoder's pre_norm, which REF's rule does not
    list)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: torch.nn.Module, weight_decay: float, layer_decay: float, depth: int | None = None,
                     strip_prefix: str = "encoder.",
                     no_decay_names: tuple[str, ...] = ("cls_token", "pos_embed")) -> list[dict]:
    """REF's param_groups_lrd: one AdamW group per (layer, decay or not) with
    lr_scale = layer_decay ** (depth + 1 - layer_id); no weight decay on 1-D parameters and
    no_decay_names. Names are matched after removing `strip_prefix` (a model that holds the ViT as
    `.encoder` gets REF's ViT names). `depth` defaults to the number of `blocks.i` found.
    Use with `set_lr`, which multiplies each group's lr (and the min_lr floor) by its lr_scale.
    """
    named = [(n[len(strip_prefix):] if strip_prefix and n.startswith(strip_prefix) else n, n, p)
             for n, p in model.named_parameters() if p.requires_grad]
    if depth is None:
        depth = 1 + max((int(n.split(".")[1]) for n, _, _ in named if n.startswith("blocks.")), default=-1)
    groups: dict[tuple[int, bool], dict] = {}
    for short, full, p in named:
        no_decay = p.ndim == 1 or short in no_decay_names
        lid = layer_id(short, depth)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [], "layer_id": lid,
                                                "lr_scale": layer_decay ** (depth + 1 - lid),
                                                "weight_decay": 0.0 if no_decay else weight_decay})
        g["params"].append(p)
        g["names"].append(full)
    return [groups[k] for k in sorted(groups)]
