"""Scoring helpers hand back the modules they were given in the mode they had: a loaded probe (eval mode) must
not come back with dropout on, and a model mid-training must go on training (a defect once: an intermediate test
of SED fine-tuning ran with drop-path on). Each helper also leaves torch's global RNG alone."""
import numpy as np
import soundfile as sf
import torch

import bat
from bat import hear, sed
from bat.data import AudioDataset, SkipLog
from bat.features import score_clips
from bat.finetuning import evaluate
from bat.frontend import Frontend
from bat.heads import Features, build_head
from bat.listing import list_dataset
from bat.model import Encoder
from bat.online_probe import probe_accuracy, probe_set
from bat.probes import Probe
from synth_sets import make_event_task

CPU = torch.device("cpu")


def modes(*modules):
    return [m.training for module in modules for m in module.modules()]


def test_clip_scoring_keeps_a_loaded_probe_in_eval_mode_and_a_training_one_training(tmp_path):
    enc = bat.load_encoder("random:tiny")
    head = build_head("cgp", enc.cfg.dim, enc.cfg.depth, 3, prototypes=8, dropout=0.5)
    x = torch.randn(2, 16000)
    probe = Probe(enc, head, Frontend.from_config(enc.frontend_config), ["a", "b", "c"], "multiclass", 16000)
    feats = Features.from_layers(enc.forward_layers(probe.frontend(x)).detach(), True, True, True)
    for training in (False, True):
        head.train(training)
        before = modes(head)
        score_clips(head, (feats, torch.zeros(2, dtype=torch.long)), CPU, 4, SkipLog())
        assert modes(head) == before
    # fine-tuning's evaluate: a Probe with a drop-path encoder, mid-run (training) or handed over in eval mode
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sf.write(tmp_path / name / "x.wav", 0.1 * np.random.default_rng(0).standard_normal(16000).astype(np.float32),
                 16000)
    items = list_dataset(str(tmp_path))
    ds = AudioDataset(items, items.classes, clip_samples=16000)
    ft = Probe(Encoder(enc.cfg, drop_path=0.5), build_head("lp", enc.cfg.dim, enc.cfg.depth, 2),
               Frontend.from_config(enc.frontend_config), items.classes, "multiclass", 16000)
    for training in (False, True):
        ft.train(training)
        before = modes(ft)
        torch.manual_seed(0)
        want = torch.rand(1)
        torch.manual_seed(0)
        first, _ = evaluate(ft, ds, 2, 0, CPU, SkipLog(), 0, 1)
        assert torch.equal(torch.rand(1), want)  # scored without drop-path: no draws
        assert torch.equal(evaluate(ft, ds, 2, 0, CPU, SkipLog(), 0, 1)[0], first) and modes(ft) == before


def test_online_probe_and_hear_leave_the_callers_encoder_as_it_was():
    enc = bat.load_encoder("random:tiny")
    probe = probe_set("demo", 12, 16000, 112, SkipLog())
    for training in (False, True):
        enc.train(training)
        probe_accuracy(enc, probe, CPU, torch.autocast("cpu", enabled=False))
        assert enc.training is training
    ft = Encoder(enc.cfg, drop_path=0.2).train()  # an encoder still being fine-tuned, wrapped to take embeddings
    ft.frontend_config = enc.frontend_config
    mix = hear.LayerMixEncoder(ft, enc.frontend_config)
    assert ft.training
    torch.manual_seed(0)
    a = hear.get_scene_embeddings(torch.randn(1, 16000), mix)
    torch.manual_seed(0)
    b = hear.get_scene_embeddings(torch.randn(1, 16000), mix)
    assert torch.equal(a, b) and ft.training  # scored without drop-path, and still training afterwards


def test_sed_scoring_runs_the_encoder_in_eval_mode_and_gives_its_mode_back(tmp_path):
    task = make_event_task(str(tmp_path / "task"), n_train=1, n_valid=1, n_test=1, train_s=2.0, test_s=2.0)
    _, valid, _ = sed.plan_splits(task)
    base = bat.load_encoder("random:tiny")
    enc = Encoder(base.cfg, drop_path=0.5).train()  # a fine-tuning run's encoder between steps
    enc.frontend_config = base.frontend_config
    head = build_head("lp", base.cfg.dim, base.cfg.depth, len(valid.classes), mode="frame").train()
    ds = sed.EventDataset(valid, valid.classes, sed.event_frontend(enc))
    torch.manual_seed(0)
    want = torch.rand(1)
    torch.manual_seed(0)
    first, _ = sed.predict_recordings(enc, head, ds, CPU)
    assert torch.equal(torch.rand(1), want)  # no drop-path draws
    second, _ = sed.predict_recordings(enc, head, ds, CPU)
    assert all(np.array_equal(a, b) for a, b in zip(first, second)) and enc.training and head.training
