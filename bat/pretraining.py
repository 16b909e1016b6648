"""BAT pretraining: masked latent regression with an EMA teacher,
as in the BAT paper and REF (the authors' code).

    student = Student(encoder, decoder)             # REF's MLR_Student (state dict keys encoder.*, decoder.*)
    targets = teacher_targets(teacher, spec)         # (B, N, D): LN(mean_l IN(h_l)) of the teacher's blocks
    cls, pred = student(spec, ids_keep)              # V views per clip, each with its own kept patches
    loss, loss_global, loss_local = ssl_losses(cls, pred, targets, mask)
    out = ssl_step(student, teacher, frontend, batch, device)  # the lines above, from a batch of waveforms

The data side of pretraining is here too: `PretrainClips` (decode, circular roll, random crop, skip
unreadable files), `StreamBatches` (each process's share of one global stream of clips, resumable
at any step) and `MaskCollate` (zero-pad the waveforms, draw every view's mask, in the loader
workers). Every random choice of the data pipeline is a pure function of (seed, a clip's position
in the stream), so a resumed run sees exactly the batches and masks of an uninterrupted one, with
any number of workers, processes or accumulation steps.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

from bat.audio import SAMPLE_RATE, AudioError
from bat.data import seeded_generator
from bat.masking import inverse_block_mask
from bat.model import FREQ_PATCHES, PATCH, Decoder, Encoder, config_for
from bat.optim import param_groups

EPS = 1e-6  # REF's epsilon of the target normalisations (added to the biased variance)

# ----------------------------------------------------------------------------------- the model


class Student(nn.Module):
    """Encoder on each view's kept patches, then the ViT decoder predicts every position.

    The clip's spectrogram is patch-embedded once and every view gathers its kept tokens from it,
    which is REF's computation (REF embeds the V repeated copies) without the V-fold copy.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, spec: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """spec (B, 1, T, 128), ids_keep (B*V, K) sorted kept patches of the views (clip 0's V views
        first) -> CLS outputs (B*V, D), predictions for all N positions (B*V, N, D)."""
        enc = self.encoder
        x = enc.patch_embed(spec)
        B, N, D = x.shape
        BV, K = ids_keep.shape
        if BV % B:
            raise ValueError(f"{BV} masks for {B} clips: expected a whole number of views per clip")
        x = x + enc.pos_embed[:, :N].to(x.dtype)
        # row of view j's token i in the flattened (B*N, D) clip tokens: clip(j) * N + ids_keep[j, i]
        clip = torch.arange(B, device=x.device).repeat_interleave(BV // B)
        x = x.reshape(B * N, D)[clip[:, None] * N + ids_keep]  # (B*V, K, D)
        x = torch.cat([enc.cls_token.expand(BV, -1, -1).to(x.dtype), x], dim=1)
        x = enc.pre_norm(x)
        for blk in enc.blocks:  # only the last block's output is needed: no per-layer stack here
            x = blk(x)
        return x[:, 0], self.decoder(x[:, 1:], ids_keep, N)


def build_models(cfg, device: torch.device) -> tuple[Student, Encoder]:
    """Student (encoder + decoder, REF's init) and the teacher, an exact copy of the student encoder, for a
    pretrain.py Config (model, target_frames, decoder_*). The positional grid is REF's: (8, target_frames / 16),
    which also sets the encoder's chunk length."""
    time_patches = cfg.target_frames // PATCH
    encoder = Encoder(config_for(cfg.model, chunk_patches=time_patches))
    encoder.init_pretraining_weights()
    decoder = Decoder(encoder.dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                      num_patches=time_patches * FREQ_PATCHES, time_patches=time_patches)
    student = Student(encoder, decoder).to(device)
    teacher = copy.deepcopy(encoder).requires_grad_(False).eval()  # never trained, only EMA-updated
    return student, teacher


def build_optimizer(cfg, student: Student, device: torch.device) -> torch.optim.AdamW:
    """AdamW for a pretrain.py Config (lr, adam_beta1/2, weight_decay, decay_all)."""
    # No weight decay on biases, LayerNorm parameters, the CLS / mask tokens and the decoder's positional
    # table (decaying them only fights the normalisation). REF decays every parameter: --decay-all.
    groups = ([{"params": list(student.parameters()), "weight_decay": cfg.weight_decay}] if cfg.decay_all
              else param_groups(student, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             fused=device.type == "cuda")


def crop_samples(target_frames: int) -> int:
    """Longest waveform that gives at most target_frames frames (1 + samples // 160); 10.23 s for 1024."""
    return (target_frames - 1) * (SAMPLE_RATE // 100)


def make_targets(layers: torch.Tensor, center: bool = False) -> torch.Tensor:
    """End-of-block outputs (L, B, N, D) -> targets (B, N, D): per layer, every channel normalised
    over the tokens (instance norm); average over layers; every token normalised over the channels
    (layer norm). No affine parameters, biased variance, eps 1e-6 inside the square root (REF).

    Instance-normalising each layer first gives every block the same weight in the average (later
    blocks have larger activations); the final layer norm puts every target token on one scale.

    center (not in REF; pretrain.py --center-targets): subtract, at every position, the mean over the
    batch's clips before the layer norm. A young teacher's outputs are mostly its positional table:
    at initialisation ~88% of the target variance is the same for every clip (benchmarks/README.md),
    so a short run mostly learns to reproduce positions. Centring leaves only what differs between
    clips to predict.
    """
    y = (layers - layers.mean(dim=2, keepdim=True)) / (layers.var(dim=2, correction=0, keepdim=True) + EPS).sqrt()
    y = y.mean(dim=0)
    if center:
        y = y - y.mean(dim=0, keepdim=True)
    return (y - y.mean(dim=-1, keepdim=True)) / (y.var(dim=-1, correction=0, keepdim=True) + EPS).sqrt()


@torch.no_grad()
def teacher_targets(teacher: Encoder, spec: torch.Tensor, center: bool = False) -> torch.Tensor:
    """The EMA teacher on the full, unmasked clips -> targets (B, N, D) in float32. The teacher may run
    under autocast; the normalisations run in float32 (they divide by small variances)."""
    layers = teacher.forward_layers(spec)[:, :, 1:]  # patch tokens of every block, CLS dropped
    return make_targets(layers.float(), center)


class Losses(NamedTuple):
    total: torch.Tensor
    global_: torch.Tensor
    local: torch.Tensor


def ssl_losses(cls: torch.Tensor, pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> Losses:
    """BAT's loss in float32, equal weights (none of EAT's scalings):

    global = mean over views and channels of (CLS output - mean over tokens of the clip's targets)^2
    local  = mean over masked patches (all views) and channels of (prediction - target)^2

    cls (B*V, D), pred (B*V, N, D), targets (B, N, D) shared by the V views of a clip, mask (B*V, N)
    True where masked. Targets are broadcast over views rather than repeated (same numbers as REF).
    """
    B, N, D = targets.shape
    V = cls.shape[0] // B
    targets = targets.float()
    loss_global = (cls.float().view(B, V, D) - targets.mean(dim=1)[:, None]).pow(2).mean()
    err = (pred.float().view(B, V, N, D) - targets[:, None]).pow(2).mean(dim=-1)  # (B, V, N)
    m = mask.view(B, V, N).to(err.dtype)
    loss_local = (err * m).sum() / m.sum()
    return Losses(loss_global + loss_local, loss_global, loss_local)


class StepOut(NamedTuple):
    losses: Losses
    targets: torch.Tensor  # (B, N, D) float32, the teacher's
    cls: torch.Tensor  # (B*V, D), the student's CLS outputs
    pred: torch.Tensor  # (B*V, N, D), the student's predictions
    mask: torch.Tensor  # (B*V, N) on the device, True = masked


def ssl_step(student, teacher: Encoder, frontend, batch: PretrainBatch, device: torch.device,
             amp=contextlib.nullcontext(), center: bool = False) -> StepOut:
    """One micro-batch of REF's ssl_train_step, as pretrain.py runs it: the waveforms' spectrograms on the
    device, the teacher's targets of the whole clips (no gradient), the student (or its DDP / compiled
    wrapper) on every view's kept patches, and the losses in float32. The caller backpropagates."""
    wave, ids_keep, mask = (x.to(device, non_blocking=True) for x in (batch.waveforms, batch.ids_keep, batch.mask))
    spec = frontend(wave)  # (B, 1, T, 128), fp32 even under autocast
    with amp:
        targets = teacher_targets(teacher, spec, center)
        cls, pred = student(spec, ids_keep)
    return StepOut(ssl_losses(cls, pred, targets, mask), targets, cls, pred, mask)


@torch.no_grad()
def feature_std(x: torch.Tensor) -> float:
    """Spread of a set of vectors (M, D): std over the M vectors per channel, averaged over channels.
    Near 0 means every token gets the same vector, i.e. collapse (a per-token norm cannot hide it)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return float(x.std(dim=0).mean()) if x.shape[0] > 1 else 0.0


# ------------------------------------------------------------------------------------- the data


class DemoSource:
    """The built-in synthetic demo set (bat.demo) as clips of varying length: clip i lasts
    seconds * (0.5 + frac(i * golden ratio)), i.e. from half to one and a half times `seconds`, so
    the zero-padding and random-crop paths both run. Pure function of (i, seed): no files, no state."""

    def __init__(self, num_clips: int, seconds: float, seed: int = 0):
        self.num_clips, self.seconds, self.seed = num_clips, seconds, seed

    def __len__(self):
        return self.num_clips

    def load(self, i: int) -> np.ndarray:
        from bat.demo import demo_clip

        frac = (i * 0.6180339887498949) % 1.0
        return demo_clip(i, self.seed, max(0.05, self.seconds * (0.5 + frac)))[0]


class PretrainItem(NamedTuple):
    position: int  # place of the clip in the global stream of clips (see StreamBatches)
    waveform: torch.Tensor  # float32 [samples]
    skipped: list  # (path, reason) of unreadable files replaced by another clip


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class PretrainClips(torch.utils.data.Dataset):
    """Clips for pretraining, addressed by (position, index) pairs from StreamBatches.

    `source` has __len__ and load(i) -> float32 numpy waveform at 16 kHz (raising bat.audio.AudioError
    for a bad file), e.g. bat.data.AudioDataset or DemoSource. Each clip is rolled circularly by a
    random amount (REF's only augmentation), then a random window of crop_samples is taken when it
    is longer; a file many windows long is read one such window at a time (`source.load_window`).
    An unreadable file is replaced by a random other clip (the batch keeps its size, so
    every process runs the same shapes) and reported in the item's `skipped` list; after max_attempts
    unreadable files in a row the item is an empty clip, and the training loop gives up. The randomness is
    seeded by the clip's stream position: the same clip at the same place of the run is always
    processed the same way, whichever process, worker or micro-batch loads it.
    """

    max_attempts = 50

    def __init__(self, source, crop_samples: int, seed: int = 0):
        self.source, self.crop_samples, self.seed = source, crop_samples, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key) -> PretrainItem:
        position, index = key
        rng = _rng(self.seed, position, 0)
        skipped = []
        window = getattr(self.source, "load_window", None)  # long files: only the window is decoded
        for _ in range(self.max_attempts):
            try:
                # a uniform circular start: the distribution of REF's roll then random cut (own draw: the
                # draws of every other clip stay as they were)
                x = window(index, self.crop_samples, _rng(self.seed, position, 1).random()) if window else None
                cut = x is not None
                x = self.source.load(index) if x is None else x
                break
            except AudioError as e:
                skipped.append((e.path, e.reason))
                index = int(rng.integers(len(self.source)))
        else:  # an empty clip: the training loop sees it and gives up with the whole story (a worker can't)
            return PretrainItem(position, torch.zeros(0), skipped)
        if not cut:
            x = np.roll(x, int(rng.integers(len(x))))
            if len(x) > self.crop_samples:
                start = int(rng.integers(len(x) - self.crop_samples + 1))
                x = x[start:start + self.crop_samples]
        return PretrainItem(position, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), skipped)


class StreamBatches(torch.utils.data.Sampler):
    """One process's endless micro-batches: lists of (position, index) pairs.

    All processes share one global stream of clips: epoch e is a permutation of the data set drawn
    from (seed, e), and the epochs follow each other, so stream position p is clip
    perm_{p // n}[p % n]. Optimiser step s uses positions [s * batch_size, (s + 1) * batch_size);
    process r reads its own contiguous share of them, micro-batch by micro-batch. Hence the clips of
    a step - and, with position-seeded crops and masks, the whole batch - do not depend on the number
    of processes or accumulation steps, nothing is dropped, a data set smaller than a batch works,
    and `start_step` resumes exactly.
    """

    def __init__(self, num_clips: int, batch_size: int, micro_batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, start_step: int = 0):
        if num_clips < 1:
            raise ValueError("no clips to train on")
        if batch_size % (world * micro_batch_size):
            raise ValueError(f"batch size {batch_size} is not a multiple of {world} x {micro_batch_size}")
        self.n, self.batch_size, self.micro, self.rank, self.seed, self.start_step = \
            num_clips, batch_size, micro_batch_size, rank, seed, start_step
        self.per_rank = batch_size // world
        self._perms: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 1:  # a step spans at most two epochs (or many tiny ones): keep it small
                self._perms.pop(min(self._perms))
            self._perms[epoch] = _rng(self.seed, epoch, 1).permutation(self.n)
        return int(self._perms[epoch][k])

    def micro_batches(self, step: int):
        first = step * self.batch_size + self.rank * self.per_rank
        for m in range(first, first + self.per_rank, self.micro):
            yield [(p, self.index(p)) for p in range(m, m + self.micro)]

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.micro_batches(step)
            step += 1

    def __len__(self):  # endless; the DataLoader never needs it
        raise TypeError("StreamBatches is an endless stream of batches")


@dataclass
class PretrainBatch:
    waveforms: torch.Tensor  # float32 (B, S), zero-padded to the longest clip (REF's collate)
    lengths: torch.Tensor  # int64 (B,)
    mask: torch.Tensor  # bool (B*V, N), True = masked; clip 0's V views first
    ids_keep: torch.Tensor  # int64 (B*V, K), sorted kept patches
    positions: torch.Tensor  # int64 (B,), stream positions of the clips
    skipped: list

    def pin_memory(self):
        return PretrainBatch(self.waveforms.pin_memory(), self.lengths.pin_memory(), self.mask.pin_memory(),
                             self.ids_keep.pin_memory(), self.positions, self.skipped)


class MaskCollate:
    """Zero-pad the clips of a batch and draw an inverse block mask for each of their V views.

    Runs in the DataLoader workers. A clip's V masks come from a generator seeded by its stream
    position (one vectorised call per clip, B calls per batch), so the masks, like the crops, do
    not depend on how the global batch is split over processes and micro-batches."""

    def __init__(self, views: int, time_patches: int, mask_ratio: float, seed: int = 0):
        self.views, self.time_patches, self.mask_ratio, self.seed = views, time_patches, mask_ratio, seed

    def __call__(self, items: list[PretrainItem]) -> PretrainBatch:
        waves = pad_sequence([it.waveform for it in items], batch_first=True)
        lengths = torch.tensor([len(it.waveform) for it in items], dtype=torch.long)
        masks = [inverse_block_mask(self.views, self.time_patches, FREQ_PATCHES, self.mask_ratio,
                                    generator=seeded_generator(self.seed, it.position, 2)) for it in items]
        return PretrainBatch(waves, lengths, torch.cat([m.mask for m in masks]), torch.cat([m.ids_keep for m in masks]),
                             torch.tensor([it.position for it in items]), [s for it in items for s in it.skipped])


def unusable_data(source, skips, what):
    """The error for a batch that holds a clip PretrainClips could not fill: every replacement it drew
    was unreadable too. `what` names the data (--data PATH)."""
    from bat.listing import DataError

    files = getattr(getattr(source, "items", None), "files", None)
    if files is not None and skips.all_unreadable(files):
        return skips.nothing_usable(files, what)
    return DataError(f"{what}: {PretrainClips.max_attempts} random clips in a row were unreadable "
                     f"({skips.count} files found unreadable so far); see the warnings above")
