"""Inverse block masking for BAT pretraining as REF draws it, batched.

The student sees only ~20% of the patches, and the ones it sees come in 5x5 blocks on the
(time x frequency) patch grid. "Inverse" because the blocks mark what is *kept*: the masked
region is everything else, so the student must predict large contiguous areas instead of
filling in isolated holes from their neighbours (which would be too easy on spectrograms).

REF's algorithm (data/bat_audio_datasets.py, SSLDataTransforms.inverse_block_mask):
1. keep_ratio = 1 - mask_ratio; draw int(N * (keep_ratio + 0.07) / 25) block centres per row,
   uniformly with replacement (torch.randint);
2. dilate every centre to a 5x5 block (max-pool, stride 1, padding 2: clipped at the grid border);
3. switch randomly chosen patches off (too many kept) or on (too few) until exactly
   int(N * keep_ratio) are kept in every row, so all views batch densely;
4. mask = 1 - kept; ids_keep = the kept indices, sorted.

Steps 1-2 draw from the generator exactly as REF does (same call, same shapes), so with the same
seed the block layout is REF's. Step 3 is REF's distribution (a uniform subset without replacement)
computed for all rows at once instead of REF's Python loop of torch.multinomial calls, so the
individual trimmed/added patches differ from REF's for a given seed, their statistics do not.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

BLOCK = 5  # block side in patches
ADJUST = 0.07  # REF's mask_prob_adjust: extra centres so fewer rows need topping up


class MaskInfo(NamedTuple):
    mask: torch.Tensor  # bool (B, N): True = masked (predicted, in the local loss), False = kept
    ids_keep: torch.Tensor  # int64 (B, K): kept patch indices, increasing; token index = 8 * t + f


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per view: int(N * (1 - mask_ratio)) with REF's float rounding (512 -> 102, 160 -> 31)."""
    return int(num_patches * (1 - mask_ratio))


def num_centres(num_patches: int, mask_ratio: float, block: int = BLOCK, adjust: float = ADJUST) -> int:
    return int(num_patches * ((1 - mask_ratio) + adjust) / block**2)


def dilated_blocks(batch: int, time_patches: int, freq_patches: int, centres: int, block: int = BLOCK,
                   generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Steps 1-2: (B, N) float {0, 1}, 1 = inside a block around one of `centres` random centres."""
    n = time_patches * freq_patches
    idx = torch.randint(0, n, (batch, centres), generator=generator, device=device)
    kept = torch.zeros(batch, n, device=device).scatter_(1, idx, 1.0)
    kept = F.max_pool2d(kept.view(batch, 1, time_patches, freq_patches), block, stride=1, padding=block // 2)
    return kept[:, 0, :time_patches, :freq_patches].reshape(batch, n)


def adjust_to_count(kept: torch.Tensor, target: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 3: keep exactly `target` patches per row -> sorted kept indices (B, target).

    One random key per patch, +1 for patches already kept, then the `target` largest keys win. A row
    with more kept patches than `target` keeps a uniformly random subset of them; a row with fewer
    keeps all of them plus a uniformly random subset of the others: REF's two multinomial branches.
    """
    keys = kept + torch.rand(kept.shape, generator=generator, device=kept.device)
    return keys.topk(target, dim=1, sorted=False).indices.sort(dim=1).values


def inverse_block_mask(batch: int, time_patches: int, freq_patches: int = 8, mask_ratio: float = 0.8,
                       block: int = BLOCK, adjust: float = ADJUST, generator: torch.Generator | None = None,
                       device="cpu") -> MaskInfo:
    """Masks for `batch` views of a (time_patches x freq_patches) grid; every row keeps the same count."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    n = time_patches * freq_patches
    target = num_kept(n, mask_ratio)
    if target < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps no patch of {n}")
    kept = dilated_blocks(batch, time_patches, freq_patches, num_centres(n, mask_ratio, block, adjust), block,
                          generator, device)
    ids_keep = adjust_to_count(kept, target, generator)
    mask = torch.ones(batch, n, dtype=torch.bool, device=device).scatter_(1, ids_keep, False)
    return MaskInfo(mask, ids_keep)
