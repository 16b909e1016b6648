"""bat.hear and bat.xares against the rules of the official checkers, for a BAT-layout checkpoint, an
EAT-layout checkpoint and an encoder pretrained by pretrain.py; the numbers against a direct
computation; 20 minutes of audio under a memory bound.

`hear_validator_checks` reproduces hearbenchmark/hear-validator (hearvalidator/validate.py), which
itself needs TensorFlow and Python < 3.9; `xares_checks` reproduces check_audio_encoder of
jimbozhang/xares (src/xares/audio_encoder_checker.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bat.hear as hear
import bat.xares as xares
import pretrain
from bat.frontend import Frontend
from bat.heads import CGP, mix_normalised
from bat.probes import Probe, save_probe
from test_model import eat_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, golden_dir):
    """{name: (path, num_heads)}: REF's trainer layout (gated golden weights, 10.24 s chunks), a fairseq
    EAT checkpoint (the same weights ungated, Kaldi front-end) and a few pretrain.py steps (tiny, 0.64 s
    chunks: many windows)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    golden = load_file(golden_dir / "encoder.safetensors")
    state = {k[6:]: v for k, v in golden.items() if k.startswith("state.") and not k.startswith("state.head.")}
    torch.save({"encoder": state, "decoder": {}, "ema_encoder": state, "optimized_steps": 1}, tmp / "bat.pt")
    torch.save(eat_checkpoint(state), tmp / "eat.pt")
    cfg = pretrain.parse_config(["--model", "tiny", "--target-frames", "64", "--batch-size", "4", "--views", "2",
                                 "--steps", "3", "--workers", "0", "--demo-clips", "16", "--out", str(tmp / "pre")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one: two threads spin-wait here
    assert pretrain.main(cfg) == 0
    torch.set_num_threads(threads)
    return {"bat": (tmp / "bat.pt", 4), "eat": (tmp / "eat.pt", 4), "pretrained": (tmp / "pre" / "encoder.safetensors", None)}


def hear_validator_checks(module, model):
    """hear-validator's checks, in its order, with its inputs (uniform noise in [-1, 1])."""
    assert isinstance(model, torch.nn.Module)
    model.to("cpu")
    assert model.sample_rate in (16000, 22050, 44100, 48000)
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    for length in (1.07, 1.98, 4.0):
        audio = torch.rand(2, int(length * model.sample_rate)) * 2 - 1.0
        emb, ts = module.get_timestamp_embeddings(audio, model)
        assert emb.dtype == torch.float32
        emb, ts = emb.detach().cpu().numpy(), ts.detach().cpu().numpy()
        assert emb.ndim == 3 and ts.ndim == 2 and emb.shape[0] == 2
        assert emb.shape[:2] == ts.shape and emb.shape[2] == model.timestamp_embedding_size
        assert ts.shape[1] > 1  # the validator's interval checks only run with two or more
        diff = np.diff(ts)
        avg = np.mean(diff)
        assert np.max(np.abs(diff - avg)) <= 1, "timestamps must be regular within 1 ms"
        assert np.max(ts) >= 1000 * length - 2 * avg, "no embeddings for the end of the audio"
        assert np.max(ts) <= 1000 * length
        assert np.min(ts) <= avg  # the validator warns otherwise
    audio = torch.rand(4, int(2.74 * model.sample_rate)) * 2 - 1.0
    scene = module.get_scene_embeddings(audio, model)
    assert scene.dtype == torch.float32
    scene = scene.detach().cpu().numpy()
    assert scene.dtype == np.float32 and scene.ndim == 2 and scene.shape == (4, model.scene_embedding_size)
    assert np.isfinite(scene).all()


def xares_checks(encoder):
    """X-ARES's check_audio_encoder, plus the hop its tasks rely on."""
    assert type(encoder).__name__.endswith("Encoder")
    assert isinstance(encoder, torch.nn.Module)
    assert hasattr(encoder, "output_dim") and hasattr(encoder, "sampling_rate") and hasattr(encoder, "device")
    sample = torch.randn(2, 50000)
    out = encoder(sample)
    assert isinstance(out, torch.Tensor) and out.ndim == 3
    assert out.size(0) == sample.size(0) and out.size(2) == encoder.output_dim
    assert out.size(1) == int(50000 / encoder.sampling_rate * 1000 // encoder.hop_size_in_ms)


@pytest.mark.parametrize("name", ["bat", "eat", "pretrained"])
def test_hear_and_xares_checks_pass(checkpoints, name):
    path, heads = checkpoints[name]
    model = hear.load_model(str(path), num_heads=heads)
    assert model.frontend.kind == ("eat" if name == "eat" else "bat")
    hear_validator_checks(hear, model)
    encoder = xares.load(str(path), num_heads=heads)
    xares_checks(encoder)
    audio = torch.randn(1, 40000) * 0.1
    assert torch.equal(encoder(audio), hear.get_timestamp_embeddings(audio, model)[0])


def test_no_clips_and_non_finite_clips(checkpoints):
    path, heads = checkpoints["bat"]
    model = hear.load_model(str(path), num_heads=heads)
    one = hear.get_timestamp_embeddings(torch.zeros(1, 20000), model)
    emb, ts = hear.get_timestamp_embeddings(torch.zeros(0, 20000), model)  # HEAR's last batch can be empty
    assert emb.shape == (0, *one[0].shape[1:]) and ts.shape == (0, one[1].shape[1])
    audio = torch.zeros(3, 20000)
    audio[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite samples \(NaN or Inf\) in clip\(s\) 1$"):
        hear.get_scene_embeddings(audio, model)
    audio = torch.zeros(3, 20000)
    audio[2, 9] = 1e18  # finite, but its spectrum overflows to NaN (bat.audio refuses such files too)
    with pytest.raises(ValueError, match=r"implausibly large samples \(beyond 1e\+08\) in clip\(s\) 2$"):
        hear.get_scene_embeddings(audio, model)


@torch.no_grad()
@pytest.mark.parametrize("name", ["eat", "pretrained"])
def test_embeddings_are_the_layer_mix_of_each_window(checkpoints, name):
    """Direct computation, window by window: front-end on the window (Kaldi windows overlap by 240
    samples so every frame is the whole signal's), all blocks, mean of the L2-normalised layers, mean
    over the 8 frequency patches; timestamps at the centres of the 16 frames of each time patch."""
    path, heads = checkpoints[name]
    model = hear.load_model(str(path), num_heads=heads)
    chunk = model.window_patches
    hop, extra = chunk * 16 * 160, (240 if name == "eat" else 0)
    audio = torch.randn(2, 2 * hop + extra + 5000) * 0.1  # two whole windows and a ragged end
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    frontend = Frontend(**{k: v for k, v in model.encoder.frontend_config.items() if k != "target_frames"})
    expected = []
    for start in (0, hop, 2 * hop):
        spec = frontend(audio[:, start:start + hop + extra])
        spec = spec[:, :, :spec.shape[2] // 16 * 16]
        tokens = model.encoder.forward_layers(spec)[:, :, 1:]
        gate = torch.full((tokens.shape[0],), 1 / tokens.shape[0])
        expected.append(mix_normalised(tokens, gate).reshape(2, spec.shape[2] // 16, 8, -1).mean(2))
    expected = torch.cat(expected, 1)
    assert emb.shape == expected.shape and torch.allclose(emb, expected, atol=1e-5)
    frame0 = 12.5 if name == "eat" else 0.0  # Kaldi frames are 25 ms long, BAT's STFT frames centred
    assert torch.allclose(ts[0], frame0 + 75 + 160 * torch.arange(emb.shape[1]).float())
    scene = hear.get_scene_embeddings(audio, model)
    assert torch.allclose(scene, emb.mean(1))


def test_a_probe_file_brings_its_learnt_gate(checkpoints, tmp_path):
    path, _ = checkpoints["pretrained"]
    plain = hear.load_model(str(path))
    head = CGP(plain.encoder.dim, plain.encoder.num_layers, 3, num_prototypes=4)
    with torch.no_grad():
        head.gate_logits.copy_(torch.arange(plain.encoder.num_layers, dtype=torch.float32))
    save_probe(tmp_path / "probe.safetensors", Probe(plain.encoder, head, Frontend("bat", 64), ["a", "b", "c"],
                                                     "multiclass"))
    model = hear.load_model(str(tmp_path / "probe.safetensors"))
    assert torch.allclose(model.gate, head.gate_weights()) and not torch.allclose(model.gate, plain.gate)
    audio = torch.randn(1, 20000) * 0.1
    assert not torch.allclose(hear.get_scene_embeddings(audio, model), hear.get_scene_embeddings(audio, plain))
    assert plain.frontend.target_frames is None and model.frontend.target_frames is None  # windows set the length


def test_slow_twenty_minutes_stay_under_the_memory_bound(checkpoints):
    """20 min at 16 kHz (73 MB of float32) through the EAT checkpoint (overlapping Kaldi windows):
    embedding it may add at most 200 MB to the process's peak (measured: ~120 MB; the Kaldi front-end
    alone on the whole input at once adds ~960 MB)."""
    path, heads = checkpoints["eat"]
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hear_memory.py"), "--encoder", str(path),
                          "--num-heads", str(heads), "--minutes", "20"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["frames"] == 7499 and out["audio_ms"] - 2 * 160 <= out["last_timestamp_ms"] <= out["audio_ms"]
    assert out["growth_mb"] < 200, out
