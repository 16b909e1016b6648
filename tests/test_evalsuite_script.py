"""probe_cgp.py end to end for the evaluation suite's parts: --probe h2t / vqt, a BEATs encoder, --task hsn
(tiny encoders, few steps, generated data)."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

import bat
import probe_cgp
from bat.beats import BEATs, BeatsConfig
from bat.checkpoint import save_encoder
from bat.data import AudioDataset, collate
from bat.listing import list_dataset
from bat.metrics import classification_metrics

SR = 32000
BIRDS = {"wren": 9000.0, "finch": 11000.0, "tit": 13000.0}  # above 8 kHz: only a 32 kHz front-end hears them


def run(tmp_path, **kw):
    cfg = probe_cgp.config(**{"encoder": "random:tiny", "out": str(tmp_path / "out"), "prototypes": 16,
                              "steps": 6, "batch_size": 6, "workers": 0, "select": "none", **kw})
    return probe_cgp.main(cfg)


def reload_and_score(out, test_dir, clip_samples):
    """The saved probe alone (bat.load_probe, its own front-end) -> test metrics."""
    probe = bat.load_probe(out / "probe.safetensors")
    ds = AudioDataset(list_dataset(test_dir), probe.labels, clip_samples=clip_samples,
                      sample_rate=probe.frontend.sample_rate)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = probe(probe.frontend(batch.waveforms))
    return probe, classification_metrics(logits, batch.targets, probe.task)


@pytest.mark.parametrize("kind,norm", [("h2t", True), ("vqt", True), ("vqt", False)])
def test_h2t_and_vqt_train_and_reload(demo_sets, tmp_path, kind, norm):
    metrics = run(tmp_path, train=str(demo_sets / "train"), test=str(demo_sets / "test"), probe=kind,
                  head_norm=norm)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_train"] == 30 and saved["num_test"] == 12 and saved["gate_weights"] is None  # the shared demo set: 5 + 2 clips per class
    probe, again = reload_and_score(out, demo_sets / "test", 16000)
    assert probe.kind == kind and type(probe.head).__name__ == {"h2t": "Head2Toe", "vqt": "VQT"}[kind]
    assert isinstance(probe.head.norm, torch.nn.LayerNorm) == norm  # --no-head-norm: REF's AS-20k VQT
    for key in ("accuracy", "mAP", "macro_f1"):
        assert abs(again[key] - metrics[key]) < 1e-6, key


def test_beats_encoder_probes_with_min_mean_max(demo_sets, tmp_path):
    torch.manual_seed(0)
    enc = BEATs(BeatsConfig(dim=48, depth=2, num_heads=4, ffn_dim=96, embed_dim=32))
    save_encoder(tmp_path / "beats.safetensors", enc)
    run(tmp_path, train=str(demo_sets / "train"), test=str(demo_sets / "test"),
        encoder=str(tmp_path / "beats.safetensors"))
    probe = bat.load_probe(tmp_path / "out" / "probe.safetensors")
    assert isinstance(probe.encoder, BEATs) and probe.kind == "cgp"
    assert probe.head.use_cls is False  # BEATs has no CLS: REF's [min, mean, max] pooling
    assert probe.frontend.kind == "beats"


def chirps(freq, seconds, rng):
    t = np.arange(int(seconds * SR)) / SR
    on = (np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)) > 0.3).astype(np.float32)
    return 0.3 * on * np.sin(2 * np.pi * freq * (1 + 0.05 * np.sin(2 * np.pi * 8 * t)) * t)


@pytest.fixture(scope="module")
def bird_sets(tmp_path_factory):
    """BirdSet-like: focal training recordings (3-7 s, one species each) and 20 s soundscapes cut into
    5 s test windows with 0-2 species, all at 32 kHz."""
    root, rng = tmp_path_factory.mktemp("birds"), np.random.default_rng(0)
    rows = ["path,labels"]
    for i in range(9):
        name = list(BIRDS)[i % 3]
        x = chirps(BIRDS[name], rng.uniform(3, 7), rng) + 0.01 * rng.standard_normal(1)
        sf.write(root / f"focal{i}.wav", x.astype(np.float32), SR)
        rows.append(f"focal{i}.wav,{name}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    rows = ["path,labels,start_s,end_s"]
    for s in range(2):
        scape = 0.005 * rng.standard_normal(20 * SR).astype(np.float32)
        for w in range(4):
            present = [n for n in BIRDS if rng.random() < 0.4] or ([] if w == 3 else [list(BIRDS)[w % 3]])
            for n in present:
                scape[w * 5 * SR:(w + 1) * 5 * SR] += chirps(BIRDS[n], 5.0, rng)
            rows.append(f"scape{s}.wav,{';'.join(present)},{5 * w},{5 * w + 5}")
        sf.write(root / f"scape{s}.wav", scape, SR)
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    return root


def test_hsn_task_runs_at_32khz(bird_sets, tmp_path):
    metrics = run(tmp_path, train=str(bird_sets / "train.csv"), test=str(bird_sets / "test.csv"), task="hsn",
                  steps=4, batch_size=4)
    assert metrics["clip_samples"] == 160000 and metrics["target_frames"] == 512 and metrics["num_test"] == 8
    assert 0 <= metrics["mAP"] <= 1
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["task"] == "hsn" and cfg["asymmetric_loss"] is False and cfg["balanced"] is True
    assert cfg["balance_by"] == "first-label" and cfg["epoch_clips"] is None  # REF: N draws with replacement
    probe = bat.load_probe(tmp_path / "out" / "probe.safetensors")
    fe = probe.frontend.config()
    assert (fe["sample_rate"], fe["n_fft"], fe["hop"], fe["target_frames"]) == (SR, 2048, 320, 512)
    assert probe.task == "multilabel" and probe.labels == sorted(BIRDS)
