"""Where a probe's training batches come from: rows of an in-memory cache of the frozen encoder's features
when they fit (bat.features), else the encoder run on every waveform batch. probe_cgp.py's training loop
reads the endless (features, targets, rows) stream this returns, whichever it is.
"""
from __future__ import annotations

import torch

from bat.data import collate, next_usable
from bat.events import EVENT_THRESHOLD, MEDIAN_PATCHES
from bat.features import build_cache, decide_cache, encode
from bat.heads import CHARS, ASRHead, frame_head
from bat.sampler import batch_stream, epoch_sampler
from bat.tasks import training_data


def training_source(cfg, task, encoder, frontend, head, run, val, data, clip_samples, frames, device, skips, rank,
                    world):
    """(cache, validation source, batches): `batches(head, progress)` starts a new endless stream of (features,
    targets, rows) training batches at progress.consumed batches into it and counts there the batches it takes
    (bat.finetuning.Progress: a resumed run goes on with the batches an uninterrupted one would take next), the
    same order on every call for a seed (each learning rate of a grid sees the same batches). With a cache
    (features of every usable training clip, and (features, targets) of the validation clips) the batches are
    rows of it; otherwise the encoder runs on every waveform batch, and validation streams too.

    Under torchrun the batches are this process's part of each step's batch: with a cache, every process
    draws the same batch of rows and takes every world-th row of it (so the step equals one process's);
    streaming, each process draws its own batch_size / world clips (a distributed shuffle, as finetune.py)."""
    eval_bs, clips = 2 * cfg.batch_size, len(run.train) + (len(val) if val is not None else 0)
    cache = val_source = None
    if decide_cache(head, encoder, clips, frames, device, task, clip_samples, cfg.cache_features, cfg.no_cache):
        cache = build_cache(encoder, frontend, head, data(run.train), eval_bs, cfg.workers, device, skips,
                            what=training_data(cfg.train, run), rank=rank, world=world)
        if val is not None:
            val_source = build_cache(encoder, frontend, head, data(val), eval_bs, cfg.workers, device, skips,
                                     "caching validation features", "the validation data", rank, world)[:2]
    elif val is not None:
        val_source = (encoder, frontend, data(val), cfg.workers)
    n, classes = (len(run.train) if cache is None else cache[1].shape[0]), run.train.classes
    labels = None
    if cfg.balanced:  # with a cache, of its rows: the clips that could be read
        items = run.train if cache is None else run.train.subset(cache[2].tolist())
        labels = items.sampling_labels(classes, cfg.balance_by)

    def cached(head, progress):  # the rows of the cache: any head of this kind reads them
        sampler = epoch_sampler(n, labels, cfg.balanced, cfg.epoch_clips, len(classes), seed=cfg.seed,
                                by=cfg.balance_by)
        # each epoch's order is a function of (seed, epoch): starting mid-stream draws what a full run did there
        rows, _ = batch_stream(range(n), sampler, cfg.batch_size, 0, cfg.seed, start=progress.consumed)
        for i in rows:
            progress.consumed += 1
            i = i[rank::world].to(device)
            yield cache[0].index(i), cache[1][i], len(i)

    def streamed(head, progress):  # VQT's query tokens are the head's own: it encodes with the head it trains
        sampler = epoch_sampler(n, labels, cfg.balanced, cfg.epoch_clips, len(classes), world, rank, cfg.seed,
                                cfg.balance_by)
        # keyed: a clip's random window and noise depend on its place in the stream, not on --workers, so a
        # stream started at progress.consumed repeats an uninterrupted run's draws
        batches, _ = batch_stream(data(run.train, train=True), sampler, cfg.batch_size // world, cfg.workers,
                                  cfg.seed, progress.consumed, collate, rank, keyed=True)
        while True:
            batch, taken = next_usable(batches, skips, run.train.files, training_data(cfg.train, run))
            progress.consumed += taken  # batches without a readable clip count too: they are skipped on resume
            feats, targets = encode(encoder, frontend, head, batch, device, grad=True), batch.targets.to(device)
            yield feats, targets, len(targets)

    return cache, val_source, cached if cache is not None else streamed


def frame_probe_parts(cfg, encoder, device, skips):
    """--task dcase2016 (sound event detection, bat.sed) or librispeech (the ASR probe, bat.asr): (head,
    labels, kind, frontend, file metadata, cached, (train, valid, test), parts) where parts() returns the
    training loop's (batches, loss, validate, test)."""
    from bat import asr, sed
    from bat.tasks import resolve_task

    torch.manual_seed(cfg.seed)
    if cfg.task == "librispeech":
        splits = train, valid, test = asr.plan_splits(cfg.train, cfg.test)
        head = ASRHead(encoder.cfg.dim, encoder.cfg.depth, hidden=cfg.asr_hidden, dropout=cfg.dropout).to(device)
        cache = cfg.cache_features  # REF streams: cached utterances are encoded unpadded
        parts = lambda: asr.probe_parts(encoder, head, train, valid, test, device, cfg.batch_size, cache,  # noqa: E731
                                        cfg.seed, cfg.workers, skips)
        return head, list(CHARS), "asr", asr.speech_frontend(encoder), {}, cache, splits, parts
    splits = train, valid, test = sed.plan_splits(cfg.train, cfg.test)
    head = frame_head(cfg.probe, encoder.cfg.dim, encoder.cfg.depth, len(train.classes), cfg.prototypes,
                      cfg.dropout).to(device)
    frames = cfg.target_frames or sed.recording_frames(train)
    cache = decide_cache(head, encoder, len(train), frames, device, resolve_task(cfg.task), None,
                         cfg.cache_features, cfg.no_cache)
    parts = lambda: sed.probe_parts(encoder, head, train, valid, test, device, cfg.batch_size, frames,  # noqa: E731
                                    cache, cfg.seed, cfg.workers, skips)
    extra = {"frame_wise": True, "patch_seconds": sed.PATCH_SECONDS, "threshold": EVENT_THRESHOLD,
             "median_filter_patches": MEDIAN_PATCHES}
    return head, train.classes, "sed", sed.event_frontend(encoder), extra, cache, splits, parts
