"""Fine-tuning pieces: layer-wise LR decay and REF's schedule, drop-path, augmentations, balanced sampler.

Statistical checks use fixed seeds and tolerances several standard errors wide, so they are
deterministic and would still fail for a wrong formula (each notes the size of the effect it tests).
"""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import finetune
from bat import augment as A
from bat.finetuning import build_model, training_inputs
from bat.frontend import Frontend
from bat.listing import list_dataset
from bat.optim import layer_id, lr_at, param_groups_lrd, set_lr
from bat.model import Encoder, EncoderConfig, drop_path
from bat.sampler import BalancedSampler, EpochBatches, balanced_weights, class_frequencies, first_label_weights

SSL_FACTS = json.loads((Path(__file__).resolve().parent / "golden" / "ssl.json").read_text())["facts"]


def small_model(depth=4, drop=0.1):
    cfg = finetune.Config(encoder="random:tiny", train="unused", drop_path=drop, head_dropout=0.2)
    base = Encoder(EncoderConfig(dim=32, depth=depth, num_heads=2))
    return build_model(cfg, base, ["a", "b", "c"], "multiclass", {"kind": "bat", "target_frames": 64},
                                torch.device("cpu")), base


# ------------------------------------------------------------------ layer-wise LR decay


def test_layer_decay_groups_follow_ref():
    depth, decay = 4, 0.75
    model, _ = small_model(depth)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=decay)  # depth read from the model
    scale, wd = {}, {}
    for g in groups:
        for n in g["names"]:
            assert n not in scale, f"{n} in two groups"
            scale[n], wd[n] = g["lr_scale"], g["weight_decay"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(scale) == trainable  # every trainable parameter exactly once
    # REF: lr_scale = decay^(num_layers - layer_id), num_layers = depth + 1
    lowest = decay ** (depth + 1)
    for n in ("encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.cls_token"):
        assert scale[n] == pytest.approx(lowest), n  # the lowest group, said explicitly
    for i in range(depth):
        for n in (f"encoder.blocks.{i}.attn.qkv.weight", f"encoder.blocks.{i}.attn.gate.bias",
                  f"encoder.blocks.{i}.norm2.weight", f"encoder.blocks.{i}.mlp.fc2.weight"):
            assert scale[n] == pytest.approx(decay ** (depth - i)), n
    for n in ("head.fc.weight", "head.fc.bias", "head.norm.weight", "encoder.pre_norm.weight", "encoder.pre_norm.bias"):
        assert scale[n] == 1.0, n  # head; pre_norm falls into REF's "anything else" (full rate)
    assert "encoder.pos_embed" not in trainable  # the fixed sin-cos table is a buffer, not trained
    # weight decay: not on 1-D parameters nor on the CLS token (REF's no_weight_decay_list)
    for n, p in model.named_parameters():
        expect = 0.0 if p.ndim == 1 or n == "encoder.cls_token" else 0.05
        assert wd[n] == expect, n
    # the base model (depth 12): patch embedding at 0.75^13 = 0.0238 of the peak rate, block 0 at 0.75^12
    assert layer_id("patch_embed.proj.weight", 12) == 0
    assert layer_id("blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id("head.fc.weight", 12) == 13


def _check_schedule(fact, lr_scale=1.0):
    p = fact["params"]
    values = next(v for k, v in fact.items() if k.startswith("values"))
    for step, want in values.items():
        got = lr_at(int(step), p["lr"], p["warmup_steps"], p["total_steps"], p["min_lr"], lr_scale)
        assert got == pytest.approx(want * lr_scale, rel=1e-9, abs=1e-15), (step, got, want)


def test_lr_schedule_matches_ref_values():
    _check_schedule(SSL_FACTS["lr_schedule_as20k_finetune"])  # the fine-tuning recipe, REF's numbers
    _check_schedule(SSL_FACTS["lr_schedule_as20k_cgp_probe"])  # same rule, other settings
    _check_schedule(SSL_FACTS["lr_schedule_REF_ssl_yaml"])
    # min_lr is scaled with the group too ("min_lr is scaled too" in REF's param_groups_lrd use)
    low = 0.75 ** 13
    assert lr_at(0, 5e-5, 4000, 40000, 1e-6, low) == pytest.approx(1e-6 * low)
    assert lr_at(4000, 5e-5, 4000, 40000, 1e-6, low) == pytest.approx(5e-5 * low)


def test_optimizer_groups_get_their_scaled_rates():
    model, _ = small_model(3)
    groups = param_groups_lrd(model, 0.05, 0.75)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=5e-5)
    set_lr(opt, 2000, 5e-5, 4000, 40000, 1e-6)
    rates = {round(g["lr"] / 2.5e-5, 9) for g in opt.param_groups}
    assert rates == {round(0.75 ** k, 9) for k in range(5)}  # depth 3: scales 0.75^4 .. 0.75^0


# ------------------------------------------------------------------------------ drop-path


def test_drop_path_is_linear_over_depth_and_keeps_the_weights():
    model, base = small_model(depth=6, drop=0.1)
    rates = [blk.drop_path for blk in model.encoder.blocks]
    assert rates == pytest.approx([0.1 * i / 5 for i in range(6)])  # torch.linspace(0, 0.1, depth) as REF
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    for k, v in base.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    # evaluation: drop-path off, the same function as the encoder without it
    spec = torch.rand(2, 1, 64, 128)
    model.eval()
    assert torch.allclose(model.encoder(spec), base.eval()(spec), atol=1e-6)


def test_drop_path_drops_whole_examples_at_its_rate():
    torch.manual_seed(9)
    x = torch.ones(20000, 5, 3)
    out = drop_path(x, 0.3, training=True)
    dropped = (out == 0).all(dim=(1, 2))
    kept = (out == 1 / 0.7).all(dim=(1, 2))
    assert torch.equal(dropped | kept, torch.ones_like(dropped))  # per example, all or nothing
    assert abs(dropped.float().mean().item() - 0.3) < 0.015  # SE 0.003
    assert abs(out.mean().item() - 1.0) < 0.03  # rescaled: the expectation is unchanged
    assert torch.equal(drop_path(x, 0.3, training=False), x)


# ------------------------------------------------------------------------------ mixup


def test_mixup_mixes_inputs_and_labels_with_the_reversed_batch():
    torch.manual_seed(0)
    B, C = 8, 5
    x = torch.randn(B, 1, 32, 128)
    y = torch.nn.functional.one_hot(torch.arange(B) % C, C).float()
    xm, ym, a = A.mixup(x, y, p=1.0, beta=0.8)
    ax = a.view(B, 1, 1, 1)
    assert torch.allclose(xm, (1 - ax) * x + ax * x.flip(0))
    assert torch.allclose(ym, (1 - a[:, None]) * y + a[:, None] * y.flip(0))
    assert torch.allclose(ym.sum(1), torch.ones(B))  # one-hot stays a distribution
    assert ((a > 0) & (a < 1)).all()
    # soft multi-hot labels are clamped to [0, 1] (both sources may hold the same class)
    ymh = torch.ones(B, C)
    assert A.mixup(x, ymh, p=1.0)[1].eq(1).all()


def test_mixup_probability_and_beta_distribution():
    torch.manual_seed(1)
    n = 40000
    x, y = torch.zeros(n, 1), torch.zeros(n, 2)
    _, _, a = A.mixup(x, y, p=0.9, beta=0.8)
    mixed = a > 0
    assert abs(mixed.float().mean().item() - 0.9) < 0.01  # SE 0.0015
    am = a[mixed]
    # Beta(0.8, 0.8): mean 0.5, variance ab / ((a+b)^2 (a+b+1)) = 0.0962 (uniform: 0.0833)
    assert abs(am.mean().item() - 0.5) < 0.01
    assert abs(am.var().item() - 0.64 / (2.56 * 2.6)) < 0.004
    x1 = torch.randn(4, 3)
    assert torch.equal(A.mixup(x1, torch.eye(4, 3), p=0.0)[0], x1)  # p = 0: untouched


def test_mixup_rejects_integer_labels():
    with pytest.raises(ValueError, match="float label"):
        A.mixup(torch.zeros(2, 3), torch.tensor([0, 1]))


# -------------------------------------------------------------------------- SpecAugment


def _bands(mask_1d):
    """Lengths of the runs of True in a 1-D bool tensor."""
    runs, n = [], 0
    for v in mask_1d.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("freq_w,time_w,repeats", [(16, 64, 2), (16, 32, 1), (0, 20, 3)])
def test_spec_augment_masks_stay_within_their_limits(freq_w, time_w, repeats):
    torch.manual_seed(2)
    B, T, F = 256, 200, 128
    out = A.spec_augment(torch.rand(B, 1, T, F) + 0.5, freq_w, time_w, repeats)  # input never 0
    zero = out[:, 0] == 0
    t_masked = zero.all(dim=2)  # [B, T] whole frames zeroed
    f_masked = zero.all(dim=1)  # [B, F] whole bins zeroed
    # every zero lies in a masked frame or bin: masks are full bands, nothing else is touched
    assert torch.equal(zero, t_masked[:, :, None] | f_masked[:, None, :])
    for b in range(B):
        tb, fb = _bands(t_masked[b]), _bands(f_masked[b])
        assert len(tb) <= repeats and sum(tb) <= repeats * time_w and all(w <= repeats * time_w for w in tb)
        assert len(fb) <= repeats and sum(fb) <= repeats * freq_w
    if repeats == 1:  # one band per axis: floor(U * width) wide, so below the parameter (torchaudio)
        assert t_masked.sum(1).max() < time_w and f_masked.sum(1).max() < max(freq_w, 1)
    # widths ~ U(0, w): the mean masked width of one band is about w/2, and masks differ per example
    if repeats == 1:
        assert abs(t_masked.sum(1).float().mean().item() - (time_w - 1) / 2) < 0.15 * time_w
        assert abs(f_masked.sum(1).float().mean().item() - (freq_w - 1) / 2) < 0.15 * freq_w
    assert len({tuple(r.nonzero().flatten().tolist()) for r in t_masked}) > B // 2


def test_spec_augment_off_is_identity():
    x = torch.rand(3, 1, 64, 128)
    assert torch.equal(A.spec_augment(x, 0, 0, 2), x)
    assert torch.equal(A.spec_augment(x, 16, 64, 0), x)


# ------------------------------------------------------------------ waveform augmentations


def test_coloured_noise_hits_the_requested_snr():
    torch.manual_seed(3)
    x = torch.randn(16, 16000) * torch.logspace(-3, 0, 16)[:, None]  # levels over 60 dB
    for snr in (5.0, 12.5, 25.0):
        noisy = A.coloured_noise(x, p=1.0, snr_db=(snr, snr))
        noise = noisy - x
        measured = 10 * torch.log10(x.square().mean(1) / noise.square().mean(1))
        assert (measured - snr).abs().max() < 0.01, measured
    # SNR ~ U(5, 25) per clip: measured values spread over that range
    noisy = A.coloured_noise(x.repeat(64, 1), p=1.0)
    measured = 10 * torch.log10(x.repeat(64, 1).square().mean(1) / (noisy - x.repeat(64, 1)).square().mean(1))
    assert measured.min() >= 5 - 1e-3 and measured.max() <= 25 + 1e-3
    assert abs(measured.mean().item() - 15) < 1.0 and measured.std().item() > 4  # U(5, 25): std 5.8


def test_coloured_noise_spectrum_follows_the_power_law():
    torch.manual_seed(4)
    n, S = 64, 8192
    x = torch.randn(n, S)
    for e in (-2.0, 0.0, 1.0, 2.0):
        noise = A.coloured_noise(x, p=1.0, exponent=(e, e), snr_db=(10, 10)) - x
        power = torch.fft.rfft(noise, dim=1).abs().square().mean(0)[1:]  # skip DC
        k = torch.arange(2, power.shape[0] + 2, dtype=torch.float32)  # REF's bin index k + 1
        # least-squares slope of log power against log k over all bins
        lk, lp = k.log(), power.log()
        slope = ((lk - lk.mean()) * (lp - lp.mean())).sum() / (lk - lk.mean()).square().sum()
        assert abs(slope.item() + e) < 0.05, (e, slope.item())


def test_coloured_noise_probability_and_padding():
    torch.manual_seed(5)
    x = torch.randn(4000, 400)
    changed = (A.coloured_noise(x, p=0.3) != x).any(1).float().mean().item()
    assert abs(changed - 0.3) < 0.025  # SE 0.007
    # zero-padded batch: padding stays silent and the SNR holds over each clip's own samples
    lengths = torch.tensor([400, 250, 100, 37])
    xp = torch.randn(4, 400) * A.valid_mask(lengths, torch.zeros(4, 400))
    noisy = A.coloured_noise(xp, p=1.0, snr_db=(10, 10), lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        assert (noisy[i, n:] == 0).all()
        snr = 10 * torch.log10(xp[i, :n].square().mean() / (noisy[i, :n] - xp[i, :n]).square().mean())
        assert abs(snr.item() - 10) < 0.01


def test_coloured_noise_draws_from_a_generator_of_its_own_when_given_one():
    """bat.sed's training loader draws a recording's noise from a generator keyed on its place in the stream of
    batches (exact resume): the same draws as the global RNG seeded alike, and the global RNG left alone."""
    x = torch.randn(3, 500)
    torch.manual_seed(7)
    from_global = A.coloured_noise(x, p=0.5)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    from_own = A.coloured_noise(x, p=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(from_own, from_global) and not torch.equal(from_own, x)
    assert torch.equal(torch.get_rng_state(), before)


def _shifts(out, x):
    """The circular time shift of each example of `out` relative to `x` (None where none matches)."""
    T = x.shape[2]
    return [next((s for s in range(T) if torch.equal(out[b], torch.roll(x[b], s, dims=1))), None)
            for b in range(len(x))]


def test_time_roll_of_the_training_path_is_refs_per_front_end():
    # REF: the BAT transforms roll the whole batch by one shift; the EAT/SSLAM/BEATs loaders roll each clip
    cfg = SimpleNamespace(augment=True, gain=False, noise=False, time_roll=True, mixup=False, specaug=False)
    torch.manual_seed(3)
    wave = torch.randn(6, 16000) * torch.linspace(0, 1, 16000)  # a ramp: every frame differs from the others
    for kind, per_clip in (("bat", False), ("eat", True)):
        fe = Frontend(kind, dataset="audioset") if kind != "bat" else Frontend("bat")
        plain = fe(wave, centred=True)
        seen = set()
        for _ in range(5):
            spec, _ = training_inputs(cfg, fe, plain.shape[2], wave, None, torch.zeros(6, 2), 2, "multilabel")
            shifts = _shifts(spec, plain)
            assert None not in shifts  # circular shifts of the clips' own frames
            seen.add(len(set(shifts)) > 1)
        assert seen == {per_clip}, kind


def test_random_gain_range():
    torch.manual_seed(6)
    g = A.random_gain(torch.ones(20000, 8))[:, 0]
    assert g.min() >= 0.5 and g.max() <= 1.5
    assert abs(g.mean().item() - 1.0) < 0.005 and abs(g.std().item() - math.sqrt(100 / (400 * 21))) < 0.005
    assert torch.equal(A.random_gain(torch.ones(3, 5)).std(1), torch.zeros(3))  # one gain per clip


def test_time_roll_is_a_circular_shift_per_example():
    torch.manual_seed(7)
    x = torch.rand(32, 1, 50, 128)
    shifts = _shifts(A.time_roll(x), x)
    assert None not in shifts and len(set(shifts)) > 10  # independent per example
    one = [_shifts(A.time_roll(x, per_clip=False), x) for _ in range(20)]
    assert all(None not in s and len(set(s)) == 1 for s in one)  # one shift for the batch (REF's BAT transforms)
    assert len({s[0] for s in one}) > 5


# ----------------------------------------------------------------------- balanced sampler


def _skewed_multilabel(n=2000, seed=0):
    """Multi-label set with class counts spanning ~2 orders of magnitude (AudioSet-like)."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.tensor([0.6, 0.3, 0.12, 0.05, 0.02, 0.008])
    y = (torch.rand(n, 6, generator=g) < prior).float()
    y[y.sum(1) == 0, 0] = 1.0  # every clip labelled
    return y


def test_balanced_weights_are_mean_inverse_frequency():
    labels = [[0], [0], [0], [0, 1], [2]]
    w = balanced_weights(labels)
    assert torch.allclose(w, torch.tensor([1 / 4, 1 / 4, 1 / 4, (1 / 4 + 1 / 1) / 2, 1.0], dtype=torch.float64))
    # integer labels and multi-hot give the same weights; unlabelled clips form their own group
    assert torch.equal(balanced_weights(torch.tensor([0, 0, 1])), balanced_weights([[0], [0], [1]]))
    assert torch.allclose(balanced_weights([[0], [], []]), torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64))


def test_balanced_sampler_flattens_class_frequencies():
    y = _skewed_multilabel()
    data_freq = class_frequencies(y, range(len(y)))
    sampler = BalancedSampler(y, num_samples=200, seed=0)
    drawn = []
    for epoch in range(50):  # measured over many draws
        sampler.set_epoch(epoch)
        idx = list(sampler)
        assert len(idx) == 200 and len(set(idx)) == 200  # without replacement within an epoch
        drawn += idx
    sampled_freq = class_frequencies(y, drawn)
    ratio = lambda f: (f.max() / f.min()).item()  # noqa: E731
    cv = lambda f: (f.std() / f.mean()).item()  # noqa: E731
    assert ratio(data_freq) > 30
    assert ratio(sampled_freq) < ratio(data_freq) / 5, (data_freq, sampled_freq)
    # co-occurrence limits how flat multi-label balancing can get (rare clips often carry class 0 too):
    # measured here 134 -> 11 for the max/min ratio, 1.41 -> 0.74 for the coefficient of variation
    assert cv(sampled_freq) < 0.6 * cv(data_freq)
    # the rarest class is seen far more often than its share of the data
    assert sampled_freq[-1] > 5 * data_freq[-1]


def test_balanced_sampler_is_distributed_aware():
    y = _skewed_multilabel(500, seed=1)
    world, n = 3, 100
    per_rank = [BalancedSampler(y, num_samples=n, num_replicas=world, rank=r, seed=7) for r in range(world)]
    for s in per_rank:
        s.set_epoch(4)
    parts = [list(s) for s in per_rank]
    assert all(len(p) == len(s) == math.ceil(n / world) for p, s in zip(parts, per_rank))
    flat = set().union(*map(set, parts))
    epoch = per_rank[0].epoch_indices().tolist()
    assert flat == set(epoch)  # together the ranks cover exactly one epoch's draw
    assert sum(map(len, parts)) == n + (-n) % world  # padded only to a multiple of the world size
    per_rank[0].set_epoch(5)
    assert list(per_rank[0]) != parts[0]  # a new epoch, a new draw


def test_balanced_sampler_bad_input():
    with pytest.raises(ValueError, match="clips per epoch"):
        BalancedSampler([[0], [1]], num_samples=3, replacement=False)
    with pytest.raises(ValueError, match="clips per epoch"):
        BalancedSampler([[0], [1]], num_samples=0)
    with pytest.raises(ValueError, match="rank"):
        BalancedSampler([[0], [1]], num_replicas=2, rank=2)


def test_first_label_sampling_is_refs_hsn_rule(tmp_path):
    # the CSV's label order is kept: REF weighs a BirdSet recording by its first ebird code only
    (tmp_path / "t.csv").write_text("path,labels\nw.wav,b;a\nx.wav,a\ny.wav,a;b;a\nz.wav,c;b\nv.wav,\n")
    items = list_dataset(tmp_path / "t.csv")
    assert items.labels[0] == ["b", "a"] and items.labels[2] == ["a", "b"]
    first = items.sampling_labels(by="first-label")
    assert first.tolist() == [1, 0, 0, 2, -1]  # classes a, b, c; no label: -1
    # REF: class_weights = 1 / (np.bincount(first) + 1e-8); sample_weight = class_weights[first]
    counts = np.bincount(first[first >= 0])
    want = 1.0 / (counts[first[:4]] + 1e-8)
    got = first_label_weights(first)
    assert np.allclose(got[:4].numpy(), want) and got[4] == 1.0  # unlabelled clips: one group of their own
    s = BalancedSampler(first, by="first-label", seed=1)
    assert len(s) == 5 and s.replacement  # one training set's worth per epoch, with replacement (REF)
    # over many draws every first label is drawn about equally often (here a: 2 clips, b, c: 1 each)
    y = torch.tensor([0] * 90 + [1] * 9 + [2])
    drawn = torch.cat([BalancedSampler(y, by="first-label", seed=e).epoch_indices() for e in range(60)])
    share = torch.bincount(y[drawn], minlength=3) / len(drawn)
    assert torch.all((share > 0.28) & (share < 0.39)), share
    with pytest.raises(ValueError, match="first-label"):
        BalancedSampler(first, by="first")


def test_epoch_batches_resume_mid_stream():
    y = _skewed_multilabel(50, seed=2)
    sampler = BalancedSampler(y, num_samples=23, seed=3)
    full = EpochBatches(sampler, 5)
    assert full.per_epoch == 5  # 23 clips in batches of 5: the last batch holds 3
    it = iter(full)
    stream = [next(it) for _ in range(12)]
    assert [len(b) for b in stream[:5]] == [5, 5, 5, 5, 3]
    resumed = iter(EpochBatches(BalancedSampler(y, num_samples=23, seed=3), 5, start=7))
    assert [next(resumed) for _ in range(5)] == stream[7:12]
    with pytest.raises(TypeError, match="needs a sampler with set_epoch"):  # a plain order cannot resume exactly
        EpochBatches(list(range(10)), 5)


def _saved_state(tmp_path, step=3):
    """A training state as finetune.py writes it (one process), for a small model and its optimiser."""
    from bat.data import SkipLog
    from bat.finetuning import Progress, save_progress
    from bat.metrics import Best

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "state.pt"
    save_progress("fp", str(path), model, opt, Progress(step, 5, [], Best("accuracy")), SkipLog(), 0, torch.device("cpu"))
    return path, model, opt


def test_resume_with_another_number_of_processes_says_so_and_draws_afresh(tmp_path, capsys):
    from bat.data import SkipLog
    from bat.files import load_state, save_state
    from bat.finetuning import restore

    path, model, opt = _saved_state(tmp_path)
    cfg = finetune.config(encoder="random:tiny", train="x", out=str(tmp_path))
    progress = restore(cfg, "fp", str(path), model, opt, SkipLog(), 0, torch.device("cpu"), "run", "accuracy")
    assert progress.step == 3 and progress.consumed == 5 and "note:" not in capsys.readouterr().out
    same = torch.rand(3)  # the saved RNG stream, restored
    state = load_state(path)
    state["rng"] = state["rng"] * 2  # as two processes save it
    save_state(path, state)
    draws = []
    for _ in range(2):
        restore(cfg, "fp", str(path), model, opt, SkipLog(), 0, torch.device("cpu"), "run", "accuracy")
        draws.append(torch.rand(3))
    out = capsys.readouterr().out
    assert "saved by 2 process(es), resumed by 1" in out and "differ from an uninterrupted run" in out
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], same)  # seeded, and not the saved stream


def test_a_state_from_an_earlier_bat_resumes_with_a_note(tmp_path, capsys):
    """States that may predate keyed batches and augmentations (no "draws" entry, one stream place for all
    processes) resume, and the run says it may not go on exactly as an uninterrupted one; today's states and
    those with a place per process (written after keyed draws came) resume without the note."""
    from bat.data import SkipLog
    from bat.files import load_state, save_state
    from bat.finetuning import restore

    path, model, opt = _saved_state(tmp_path)
    cfg = finetune.config(encoder="random:tiny", train="x", out=str(tmp_path))
    restore(cfg, "fp", str(path), model, opt, SkipLog(), 0, torch.device("cpu"), "run", "accuracy")
    assert "note:" not in capsys.readouterr().out
    state = load_state(path)
    del state["draws"]  # as the version that kept one stream place per process (keyed already) saved it
    save_state(path, state)
    restore(cfg, "fp", str(path), model, opt, SkipLog(), 0, torch.device("cpu"), "run", "accuracy")
    assert "note:" not in capsys.readouterr().out
    state["consumed"] = state["consumed"][0]  # as older states held it: one number
    save_state(path, state)
    progress = restore(cfg, "fp", str(path), model, opt, SkipLog(), 0, torch.device("cpu"), "run", "accuracy")
    assert progress.step == 3 and progress.consumed == 5
    assert "saved by an earlier version of bat" in capsys.readouterr().out


def test_processes_that_see_different_training_states_are_refused(tmp_path, monkeypatch):
    """--out on a disk each node has to itself: the processes would resume from different steps."""
    from bat import finetuning
    from bat.data import SkipLog
    from bat.listing import DataError

    path, model, opt = _saved_state(tmp_path)
    cfg = finetune.config(encoder="random:tiny", train="x", out=str(tmp_path))
    monkeypatch.setattr(finetuning, "all_gather_object", lambda step: [step, None])  # rank 1 sees no state
    with pytest.raises(DataError, match=r"processes see different training states .*\(steps \[3, None\]\).*shared"):
        finetuning.restore(cfg, "fp", str(path), model, opt, SkipLog(), 0, torch.device("cpu"), "run", "accuracy")


def test_hsn_fine_tuning_takes_refs_plain_bce():
    """REF configs/hsn/hsn_finetune_config.yaml: use_asymmetric_loss false (AudioSet's recipe keeps it)."""
    import torch.nn.functional as F

    from bat.finetuning import loss_fn
    from bat.losses import asymmetric_loss

    assert finetune.config(encoder="x", train="y", task="hsn").asymmetric_loss is False
    assert finetune.config(encoder="x", train="y", task="audioset").asymmetric_loss is True
    logits, y = torch.randn(4, 5), (torch.rand(4, 5) > 0.7).float()
    assert torch.equal(loss_fn(logits, y, "multilabel", asymmetric=False), F.binary_cross_entropy_with_logits(logits, y))
    assert torch.equal(loss_fn(logits, y, "multilabel"), asymmetric_loss(logits, y))


def test_class_frequencies_and_weights_read_a_listings_label_ids():
    """What AudioList.sampling_labels returns (compressed ids) is what the sampler's diagnostics take too; a
    multi-class clip without exactly one label is refused (an AudioList built by hand), not given its neighbour's."""
    from bat.listing import AudioList, DataError

    items = AudioList(files=["a", "b", "c"], labels=[["x"], ["x", "y"], ["y"]], classes=["x", "y"], task="multilabel",
                      source="csv", root="r")
    assert torch.equal(class_frequencies(items.sampling_labels(), [0, 1, 1, 2]),
                       class_frequencies(torch.tensor([[1, 0], [1, 1], [0, 1]]), [0, 1, 1, 2]))
    bad = AudioList(files=["a", "b", "c"], labels=[["x"], [], ["y"]], classes=["x", "y"], task="multiclass",
                    source="csv", root="r")
    with pytest.raises(DataError, match="b: a multi-class clip needs exactly one label, got 0"):
        bad.targets()
