"""Pretraining pieces against REF's golden vectors: one official SSL step (spectrogram, student and
teacher outputs, targets, losses, gradients, one EMA update), the LR / EMA schedules, the inverse block
masking, and the data pipeline's determinism."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bat.frontend import Frontend
from bat.masking import dilated_blocks, inverse_block_mask, num_centres, num_kept
from bat.model import Decoder, Encoder, EncoderConfig
from bat.pretraining import (DemoSource, MaskCollate, PretrainClips, PretrainItem, StreamBatches, Student,
                             feature_std, make_targets, ssl_step, teacher_targets)
from bat.online_probe import ridge_probe_accuracy
from bat.optim import EmaSchedule, ema_update, lr_at, param_groups, param_groups_lrd, set_lr


def close(a, b, atol, rtol):
    """max |a - b| - (atol + rtol |b|) <= 0, with the worst excess in the message."""
    a, b = a.detach().double(), b.detach().double()
    excess = ((a - b).abs() - (atol + rtol * b.abs())).max().item()
    return excess <= 0, f"max abs diff {(a - b).abs().max().item():.3g} (atol {atol}, rtol {rtol})"


@pytest.fixture(scope="module")
def ssl(golden_dir):
    meta = json.loads((golden_dir / "ssl.json").read_text())
    return meta, load_file(golden_dir / "ssl.safetensors")


def prefixed(t, prefix):
    return {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}


def build(meta, t):
    """Student and teacher from the fixture's config, with the stored weights (strict)."""
    c = meta["config"]
    time_patches = c["T"] // 16
    enc_cfg = EncoderConfig(dim=c["dim"], depth=c["depth"], num_heads=c["heads"], mlp_ratio=c["mlp_ratio"],
                            gated=True, chunk_patches=time_patches)  # REF's grid is (8, T/16) of its input
    dec = Decoder(c["dim"], c["dec_dim"], c["dec_depth"], c["dec_heads"], c["dec_mlp_ratio"],
                  num_patches=8 * time_patches, time_patches=time_patches)
    student = Student(Encoder(enc_cfg), dec)
    student.load_state_dict(prefixed(t, "student."), strict=True)
    teacher = Encoder(enc_cfg)
    teacher.load_state_dict(prefixed(t, "teacher.encoder."), strict=True)
    return student, teacher


@pytest.fixture(scope="module")
def step(ssl):
    """REF's ssl_train_step on the stored waveforms, through pretrain.py's own path (MaskCollate's padding,
    the script's Frontend, ssl_step), float32, REF's stored mask injected (its draw is REF's RNG)."""
    meta, t = ssl
    student, teacher = build(meta, t)
    c = meta["config"]
    collate = MaskCollate(views=c["views"], time_patches=c["T"] // 16, mask_ratio=0.8)
    batch = collate([PretrainItem(i, t[f"ssl_wave.{i}"], []) for i in range(2)])
    assert batch.mask.shape == t["mask.mask"].shape and batch.ids_keep.shape == t["mask.ids_keep_sorted"].shape
    batch.mask, batch.ids_keep = t["mask.mask"].bool(), t["mask.ids_keep_sorted"].long()
    frontend = Frontend("bat", target_frames=c["T"])  # as pretrain.py builds it
    out = ssl_step(student, teacher, frontend, batch, torch.device("cpu"))
    out.losses.total.backward()
    return dict(student=student, teacher=teacher, spec=frontend(batch.waveforms), out=out)


def test_ssl_spectrogram_matches_ref(ssl, step):
    ok, msg = close(step["spec"], ssl[1]["spectrogram"], 1e-3, 0)
    assert ok, msg


def test_student_outputs_match_ref(ssl, step):
    t = ssl[1]
    for ours, name in ((step["out"].cls, "student_out.cls"), (step["out"].pred, "student_out.pred")):
        ok, msg = close(ours, t[name], 2e-4, 1e-4)
        assert ok, f"{name}: {msg}"


def test_teacher_layers_and_targets_match_ref(ssl, step):
    t = ssl[1]
    layers = step["teacher"].forward_layers(t["spectrogram"])[:, :, 1:]  # the teacher alone, on REF's input
    ok, msg = close(layers, t["teacher_out.layer_outputs"], 2e-4, 1e-4)
    assert ok, f"layer outputs: {msg}"
    ok, msg = close(step["out"].targets, t["teacher_out.targets"], 2e-4, 1e-4)
    assert ok, f"targets: {msg}"
    # and the normalisation alone, on REF's own layer outputs
    ok, msg = close(make_targets(t["teacher_out.layer_outputs"]), t["teacher_out.targets"], 1e-5, 1e-5)
    assert ok, f"make_targets: {msg}"


def test_losses_match_ref(ssl, step):
    t = ssl[1]
    for ours, name in zip(step["out"].losses, ("loss.total", "loss.global", "loss.local")):
        ok, msg = close(ours, t[name], 1e-5, 1e-5)
        assert ok, f"{name}: {msg}"


def test_gradients_match_ref(ssl, step):
    t = ssl[1]
    grads = prefixed(t, "grad.student.")
    params = dict(step["student"].named_parameters())
    assert set(grads) == set(params), set(grads) ^ set(params)  # REF's pos_embed is frozen, ours a buffer
    for name, g in grads.items():
        ok, msg = close(params[name].grad, g, 1e-5, 1e-3)
        assert ok, f"grad {name}: {msg}"


def test_one_ema_update_matches_ref(ssl):
    meta, t = ssl
    student, teacher = build(meta, t)
    decay = EmaSchedule(0.9998, 0.99999, 100_000)(0)
    assert decay == 0.9998000264167786
    ema_update(teacher, student.encoder, decay)
    expected = prefixed(t, "ema_after.teacher.encoder.")
    state = teacher.state_dict()
    assert set(state) == set(expected)
    for name, v in expected.items():
        ok, msg = close(state[name], v, 1e-6, 0)
        assert ok, f"{name}: {msg}"
    # and the update really moved the teacher (the stored teacher differs from the student)
    before = prefixed(t, "teacher.encoder.")
    assert (state["blocks.0.attn.qkv.weight"] - before["blocks.0.attn.qkv.weight"]).abs().max() > 1e-6


def test_lr_schedule_matches_ref_values(ssl):
    facts = ssl[0]["facts"]
    for key in ("lr_schedule_REF_ssl_yaml", "lr_schedule_as20k_cgp_probe"):
        p = facts[key]["params"]
        values = next(v for k, v in facts[key].items() if k.startswith("values"))
        for s, expected in values.items():
            got = lr_at(int(s), p["lr"], p["warmup_steps"], p["total_steps"], p["min_lr"])
            assert got == pytest.approx(expected, rel=1e-12, abs=0), (key, s)
    p = facts["lr_schedule_as20k_finetune"]["params"]
    for s, expected in facts["lr_schedule_as20k_finetune"]["values (lr_scale 1 group)"].items():
        assert lr_at(int(s), p["lr"], p["warmup_steps"], p["total_steps"], p["min_lr"]) == pytest.approx(expected, rel=1e-12)
    # the floor is scaled with the group: REF's min_lr * lr_scale
    assert lr_at(0, 5e-5, 4000, 40000, 1e-6, lr_scale=0.5) == 5e-7


def test_ema_schedule_matches_ref_values(ssl):
    f = ssl[0]["facts"]["ema_schedule_REF_ssl_yaml"]
    sched = EmaSchedule(f["params"]["decay_start"], f["params"]["decay_end"], f["params"]["ema_warmup_steps"])
    values = next(v for k, v in f.items() if k.startswith("values"))
    for k, expected in values.items():
        assert sched(int(k)) == expected, k  # exact: float32 table, then the Python float end value


def test_set_lr_scales_groups_and_layer_decay_follows_ref():
    enc = Encoder(EncoderConfig(dim=32, depth=3, num_heads=2, chunk_patches=4))
    model = torch.nn.Module()
    model.encoder, model.head = enc, torch.nn.Linear(32, 5)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75)
    by_name = {n: g for g in groups for n in g["names"]}
    depth = 3
    assert by_name["encoder.cls_token"]["lr_scale"] == 0.75 ** (depth + 1)
    assert by_name["encoder.patch_embed.proj.weight"]["lr_scale"] == 0.75 ** (depth + 1)
    assert by_name["encoder.blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.75 ** depth
    assert by_name["encoder.blocks.2.attn.qkv.weight"]["lr_scale"] == 0.75
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["encoder.pre_norm.weight"]["lr_scale"] == 1.0
    assert by_name["encoder.blocks.1.norm1.weight"]["weight_decay"] == 0.0  # 1-D: no decay
    assert by_name["encoder.cls_token"]["weight_decay"] == 0.0
    assert by_name["encoder.blocks.1.attn.gate.weight"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=1.0)
    base = set_lr(opt, 2000, 5e-5, 4000, 40000)
    assert base == 2.5e-5
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2.5e-5 * g["lr_scale"], rel=1e-12)


def test_pretraining_param_groups_skip_decay_on_biases_norms_and_tokens():
    enc = Encoder(EncoderConfig(dim=32, depth=2, num_heads=2, chunk_patches=4))
    student = Student(enc, Decoder(32, 32, 1, 2, num_patches=32, time_patches=4))
    decay, no_decay = param_groups(student, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"encoder.cls_token", "decoder.mask_token", "decoder.pos_embed", "encoder.pre_norm.weight",
            "encoder.blocks.0.attn.qkv.bias"} <= set(no_decay["names"])
    assert all(student.get_parameter(n).ndim >= 2 for n in decay["names"])
    assert "encoder.blocks.1.attn.gate.weight" in decay["names"]


# ------------------------------------------------------------------------------------- masking


@pytest.fixture(scope="module")
def masking(golden_dir):
    return json.loads((golden_dir / "masking.json").read_text())


def test_kept_counts_follow_refs_truncation_rule(masking):
    assert num_kept(512, 0.8) == masking["counts_64x8_ratio_0.8"]["kept"] == 102
    assert num_centres(512, 0.8) == masking["counts_64x8_ratio_0.8"]["centres"] == 5
    assert num_centres(128, 0.8) == masking["this_set_ssl_grid"]["centres"] == 1
    for n, k in ((512, 102), (128, 25), (160, 31), (192, 38)):  # 160 -> 31, not 32 (float rounding)
        assert num_kept(n, 0.8) == k
        mi = inverse_block_mask(7, n // 8, 8, 0.8, generator=torch.Generator().manual_seed(n))
        kept = (~mi.mask).sum(1)
        assert (kept == k).all() and mi.ids_keep.shape == (7, k)
        assert (mi.ids_keep.diff(dim=1) > 0).all()  # sorted, no repeats
        assert (~mi.mask).gather(1, mi.ids_keep).all()  # ids_keep are exactly the kept patches


def test_block_layout_is_refs_for_the_same_seed(masking):
    """With REF's seed the centres and 5x5 dilation are REF's: every stored example's kept set is a
    trimmed subset (or a topped-up superset) of our pre-adjustment blocks."""
    torch.manual_seed(41)  # as REF's generator for the stored examples
    pre = dilated_blocks(3, 64, 8, 5)
    relation = []
    for row, ex in zip(pre, masking["examples_seeded"]):
        blocks, kept = set(row.nonzero()[:, 0].tolist()), set(ex["ids_keep_sorted"])
        assert len(kept) == 102 and (kept <= blocks or blocks <= kept)
        relation.append("trim" if kept < blocks else "pad" if blocks < kept else "exact")
    assert "trim" in relation and "pad" in relation  # both branches are pinned by these examples


def test_a_centre_dilates_to_a_clipped_5x5_block():
    for t0, f0, area in ((10, 4, 25), (0, 0, 9), (63, 7, 9), (1, 3, 20), (30, 6, 20)):
        kept = torch.zeros(1, 64 * 8)
        kept[0, 8 * t0 + f0] = 1
        grid = torch.nn.functional.max_pool2d(kept.view(1, 1, 64, 8), 5, 1, 2)[0, 0]
        assert grid.sum() == area
        t, f = grid.nonzero().T
        assert t.min() == max(0, t0 - 2) and t.max() == min(63, t0 + 2)
        assert f.min() == max(0, f0 - 2) and f.max() == min(7, f0 + 2)


def neighbour_share(kept_rows, T, F=8):
    """Mean share of a kept patch's 8 neighbours (inside the grid) that are kept too."""
    k = kept_rows.float().view(-1, 1, T, F)
    nb = torch.nn.functional.conv2d(torch.nn.functional.pad(k, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3)) - k
    inside = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.ones_like(k), (1, 1, 1, 1)),
                                        torch.ones(1, 1, 3, 3)) - 1
    return float(((nb / inside) * k).sum() / k.sum())


def test_mask_statistics_match_ref(masking):
    st = masking["statistics_64x8"]
    g = torch.Generator().manual_seed(0)
    n = st["masks_drawn"]
    pre = dilated_blocks(n, 64, 8, 5, generator=g).sum(1)
    lo, mean, hi = st["pre_adjust_kept_min_mean_max"]
    assert abs(pre.mean().item() - mean) < 1.5  # SE of the mean is ~0.3
    assert pre.max() <= 125 and pre.min() >= 25
    assert abs((pre > 102).float().mean().item() - st["rows_trimmed (more than target kept after dilation)"] / n) < 0.04
    assert abs((pre < 102).float().mean().item() - st["rows_padded (fewer than target)"] / n) < 0.04
    small = masking["this_set_ssl_grid"]["statistics"]
    pre16 = dilated_blocks(small["masks_drawn"], 16, 8, 1, generator=g).sum(1)
    assert abs(pre16.mean().item() - small["pre_adjust_kept_min_mean_max"][1]) < 0.5
    assert pre16.max() <= 25 and (pre16 > 25).sum() == 0
    # block structure of the final masks: a kept patch's neighbours are mostly kept, as in REF's
    # examples, and far more than under uniform masking at the same ratio (about 0.2)
    mi = inverse_block_mask(n, 64, 8, 0.8, generator=g)
    ours = neighbour_share(~mi.mask, 64)
    ref_rows = torch.zeros(len(masking["examples_seeded"]), 512, dtype=torch.bool)
    for i, ex in enumerate(masking["examples_seeded"]):
        ref_rows[i, ex["ids_keep_sorted"]] = True
    ref = neighbour_share(ref_rows, 64)
    uniform = neighbour_share(torch.rand(n, 512, generator=g).argsort(1).argsort(1) < 102, 64)
    assert uniform < 0.25 and ours > 0.45 and abs(ours - ref) < 0.1, (ours, ref, uniform)


def test_masks_are_vectorised_and_fast():
    import time
    t0 = time.perf_counter()
    inverse_block_mask(48 * 16, 64, 8, 0.8, generator=torch.Generator().manual_seed(0))  # one REF batch
    assert time.perf_counter() - t0 < 0.5


# ------------------------------------------------------------------------------------- data


def test_stream_batches_split_each_global_batch_and_resume():
    n, batch, seed = 10, 6, 5

    def step_clips(world, micro, steps=4):
        """The (position, index) pairs each step reads, over all processes and micro-batches."""
        its = [iter(StreamBatches(n, batch, micro, r, world, seed)) for r in range(world)]
        per_step = batch // world // micro
        return [sorted(pi for it in its for _ in range(per_step) for pi in next(it)) for _ in range(steps)]

    one = step_clips(1, 6)
    assert step_clips(2, 3) == one and step_clips(3, 1) == one and step_clips(1, 2) == one
    assert [p for p, _ in one[0]] == list(range(6)) and [p for p, _ in one[1]] == list(range(6, 12))
    stream = [i for step in one for _, i in step]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs
    assert stream[:10] != stream[10:20]  # reshuffled every epoch
    # process 1 of 2 reads the second half of every step, in micro-batches of 3
    it = iter(StreamBatches(n, batch, 3, 1, 2, seed))
    assert [p for p, _ in next(it)] == [3, 4, 5] and [p for p, _ in next(it)] == [9, 10, 11]
    resumed = next(iter(StreamBatches(n, batch, 3, 1, 2, seed, start_step=2)))
    assert [p for p, _ in resumed] == [15, 16, 17]
    other_seed = StreamBatches(n, batch, 6, seed=6)
    assert [other_seed.index(p) for p in range(n)] != stream[:n]


def test_clips_and_masks_are_a_function_of_the_stream_position():
    src = DemoSource(12, seconds=0.5, seed=0)
    lengths = [len(src.load(i)) for i in range(12)]
    assert min(lengths) < 8000 < max(lengths)  # the demo clips vary in length around the crop
    ds = PretrainClips(src, crop_samples=8000, seed=3)
    collate = MaskCollate(views=3, time_patches=4, mask_ratio=0.8, seed=3)
    keys = [(20, 0), (21, 5), (22, 11)]
    whole = collate([ds[k] for k in keys])
    assert whole.waveforms.shape[0] == 3 and whole.waveforms.shape[1] <= 8000 and whole.mask.shape == (9, 32)
    assert (whole.lengths <= 8000).all() and whole.skipped == [] and whole.positions.tolist() == [20, 21, 22]
    # split into two micro-batches (other processes / accumulation): the same clips and masks
    a, b = collate([ds[k] for k in keys[:1]]), collate([ds[k] for k in keys[1:]])
    assert torch.equal(torch.cat([a.ids_keep, b.ids_keep]), whole.ids_keep)
    assert torch.equal(b.waveforms, whole.waveforms[1:, :b.waveforms.shape[1]])
    assert not torch.equal(collate([ds[(23, 0)]]).ids_keep, a.ids_keep)  # another position, other masks
    # the roll is circular: same samples, shifted
    short = next(i for i in range(12) if lengths[i] <= 8000)
    x = ds[(0, short)].waveform.numpy()
    full = src.load(short)
    assert not np.array_equal(x, full) and np.array_equal(np.sort(x), np.sort(full))


def test_unreadable_files_are_replaced_and_reported(tmp_path):
    from bat.audio import AudioError

    class Flaky:
        def __len__(self):
            return 4

        def load(self, i):
            if i % 2:
                raise AudioError(f"clip{i}.wav", "cannot decode")
            return np.ones(1000, dtype=np.float32)

    ds = PretrainClips(Flaky(), crop_samples=800, seed=0)
    item = ds[(0, 1)]
    assert item.skipped and item.skipped[0] == ("clip1.wav", "cannot decode") and len(item.waveform) == 800

    class Broken(Flaky):
        def load(self, i):
            raise AudioError(f"clip{i}.wav", "cannot decode")

    item = PretrainClips(Broken(), 800)[(0, 0)]  # gives up: an empty clip, every attempt reported
    assert len(item.waveform) == 0 and len(item.skipped) == PretrainClips.max_attempts


def test_ridge_probe_and_feature_std():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 16, generator=g)
    assert ridge_probe_accuracy(x[:60], y[:60], x[60:], y[60:], 3) > 0.9
    assert ridge_probe_accuracy(torch.randn(60, 16, generator=g), y[:60], x[60:], y[60:], 3) < 0.7
    assert feature_std(torch.ones(10, 4)) == 0.0 and feature_std(torch.randn(1000, 4, generator=g)) > 0.9


def test_centred_targets_keep_only_what_differs_between_clips():
    """A random-init teacher's targets are mostly one pattern shared by every clip (its positional
    table); --center-targets removes it, and the default stays REF's targets."""
    from bat.model import config_for

    torch.manual_seed(0)
    enc = Encoder(config_for("tiny", chunk_patches=4))
    enc.init_pretraining_weights()
    spec = torch.rand(6, 1, 64, 128)
    plain, centred = teacher_targets(enc, spec), teacher_targets(enc, spec, center=True)
    shared = lambda t: float(t.mean(0).pow(2).mean() / t.pow(2).mean())  # noqa: E731  share common to all clips
    assert shared(plain) > 0.5 and shared(centred) < 0.05, (shared(plain), shared(centred))
    assert torch.equal(plain, make_targets(enc.forward_layers(spec)[:, :, 1:].float()))
    assert centred.shape == plain.shape and torch.isfinite(centred).all()


@pytest.mark.parametrize("device, world, want", [("auto", 1, 0), ("cuda", 1, 0), ("cuda:1", 1, 1), ("auto", 2, 1)])
def test_setup_distributed_on_cuda_picks_an_indexed_device(monkeypatch, device, world, want):
    """The CUDA branch, on this CPU machine: torch.cuda's answers stubbed. A bare "cuda" must become
    cuda:N (set_device refuses it); under torchrun, cuda:LOCAL_RANK (the process group is stubbed too)."""
    from bat import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d) if d.index is not None else
                        (_ for _ in ()).throw(ValueError(f"Expected a torch.device with a specified index, got {d}")))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, device_id=None: chosen.append(backend))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(world - 1))
    monkeypatch.setenv("LOCAL_RANK", str(world - 1))
    rank, n, local, dev = distributed.setup_distributed(device)
    assert dev == torch.device("cuda", want) and chosen[0] == dev and (rank, n) == (world - 1, world)
    assert chosen[1:] == (["nccl"] if world > 1 else [])
    if world > 1:  # more processes on this node than GPUs: one line (run_processes makes it a flag error)
        monkeypatch.setenv("LOCAL_RANK", "2")
        with pytest.raises(ValueError, match=r"LOCAL_RANK 2: this machine has 2 CUDA device\(s\)"):
            distributed.setup_distributed(device)


@pytest.mark.parametrize("known", [True, False])
def test_data_parallel_turns_off_the_buffer_sync_in_either_torch(monkeypatch, known):
    """torch 2.13 names the per-forward buffer sync forward_sync_buffers; earlier releases (a GPU cluster's
    torch is often older than the pinned one) know only broadcast_buffers and refuse the new name."""
    import torch.nn.parallel as parallel

    from bat.distributed import data_parallel

    got = {}

    def init_new(self, module, device_ids=None, broadcast_buffers=True, forward_sync_buffers=None, **kw):
        got.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers, forward_sync_buffers=forward_sync_buffers, **kw)

    def init_old(self, module, device_ids=None, broadcast_buffers=True, gradient_as_bucket_view=False):
        got.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers, gradient_as_bucket_view=gradient_as_bucket_view)

    fake = type("DDP", (), {"__init__": init_new if known else init_old})
    monkeypatch.setattr(parallel, "DistributedDataParallel", fake)
    data_parallel(torch.nn.Linear(2, 2), torch.device("cuda", 1), gradient_as_bucket_view=True)
    assert got["device_ids"] == [torch.device("cuda", 1)] and got["gradient_as_bucket_view"] is True
    if known:  # the per-forward sync off, the start-up copy left as it is
        assert got["forward_sync_buffers"] is False and got["broadcast_buffers"] is True
    else:
        assert got["broadcast_buffers"] is False


def test_a_long_file_is_read_one_window_at_a_time(tmp_path, monkeypatch):
    """pretrain.py on an hour-long recording decoded the whole file for every 10 s clip; a file over
    LONG_FILE windows is now read one circular window at a time, with REF's distribution of windows."""
    import soundfile as sf

    import bat.data
    import pretrain
    from bat.data import SkipLog

    n = 16000 * 40
    ramp = (np.arange(n) / n).astype(np.float32)  # a sample's value is its place in the file
    sf.write(tmp_path / "long.wav", ramp, 16000, subtype="FLOAT")
    sf.write(tmp_path / "long_44k.wav", np.zeros(44100 * 20, np.float32), 44100, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", ramp[:8000], 16000, subtype="FLOAT")
    cfg = pretrain.parse_config(["--model", "tiny", "--target-frames", "64", "--data", str(tmp_path)])
    source, _ = pretrain.clip_source(cfg, SkipLog())  # the script's own data path
    crop = pretrain.crop_samples(cfg.target_frames)
    clips = PretrainClips(source, crop, seed=5)
    whole = bat.data.load_audio

    def short_files_only(path, *a, **k):
        assert not os.path.basename(path).startswith("long"), f"{path} decoded whole"
        return whole(path, *a, **k)

    monkeypatch.setattr(bat.data, "load_audio", short_files_only)
    files = [str(f) for f in source.items.files]
    long_, long_44k, short = (files.index(str(tmp_path / f)) for f in ("long.wav", "long_44k.wav", "short.wav"))
    starts = []
    for position in range(200):
        x = clips[(position, long_)].waveform.numpy()
        assert x.shape == (crop,)
        steps = np.diff(x.astype(np.float64))
        wraps = np.flatnonzero(np.abs(steps - 1 / n) > 1e-6)  # contiguous, but for one jump past the end
        assert len(wraps) == 0 or (len(wraps) == 1 and steps[wraps[0]] < -0.9), wraps
        starts.append(x[0])
    assert np.array_equal(clips[(7, long_)].waveform, clips[(7, long_)].waveform)  # a function of the position
    assert min(starts) < 0.05 and max(starts) > 0.95 and abs(np.mean(starts) - 0.5) < 0.07  # uniform starts
    assert clips[(3, long_44k)].waveform.shape == (crop,)  # read at 44.1 kHz, resampled
    assert clips[(3, short)].waveform.shape == (8000,)  # short files: read whole, as before


def test_stop_flag_frees_its_cpu_group_when_the_main_group_is_not_gloo(monkeypatch, tmp_path):
    """Under NCCL every StopFlag (one per training run: a probe's folds and lr grid make many) opens a gloo
    group for its per-step check; it must be destroyed when the run ends, or each run leaves a group and
    its worker threads behind. The NCCL group is stood in for by a one-process gloo group."""
    import torch.distributed as dist

    from bat import run_control

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(run_control.dist, "get_backend", lambda group=None: "nccl")
        groups = len(dist.distributed_c10d._world.pg_map)
        for _ in range(3):
            with run_control.StopFlag() as stop:
                assert stop.group is not None and stop.any() == 0
                assert len(dist.distributed_c10d._world.pg_map) == groups + 1
        assert len(dist.distributed_c10d._world.pg_map) == groups
    finally:
        dist.destroy_process_group()
