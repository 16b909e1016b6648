"""BEATs encoder against REF's models/beats.py (tests/golden/beats.*, made by tests/make_golden_evalsuite.py),
Microsoft's checkpoint layout through bat.load_encoder, and BEATs inside probe files."""
import json

import pytest
import torch
from safetensors.torch import load_file

from bat.beats import BEATs, BeatsConfig
from bat.checkpoint import CheckpointError, load_beats_state, load_encoder, save_encoder
from bat.frontend import Frontend
from bat.heads import VQT, Features, build_head
from bat.probes import Probe, load_probe, save_probe

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def golden(golden_dir):
    meta = json.loads((golden_dir / "beats.json").read_text())
    return load_file(str(golden_dir / "beats.safetensors")), meta


def ref_state(g):
    return {k[6:]: v for k, v in g.items() if k.startswith("state.")}


def small_config(meta):
    c = meta["small_config"]
    return BeatsConfig(dim=c["dim"], depth=c["layers"], num_heads=c["heads"], ffn_dim=c["ffn"], embed_dim=c["embed"])


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    err = (ours - ref).abs()
    assert (err <= ATOL + RTOL * ref.abs()).all(), err.max()


@pytest.fixture(scope="module")
def model(golden):
    g, meta = golden
    m = BEATs(small_config(meta)).eval()
    load_beats_state(m, ref_state(g))
    return m


@pytest.mark.parametrize("name,export", [("short", False), ("long", False), ("short", True)])
def test_layers_match_ref(golden, model, name, export):
    # short: 16 time patches (one chunk); long: 68 = a 64-patch chunk + a ragged 4-patch chunk (padded and
    # masked); export: the branch-free path export.py traces
    g, _ = golden
    with torch.no_grad():
        out = model.forward_layers(g[f"input.{name}"], export=export)
    ref = Features.from_ref(g[f"{name}.patch_tokens"], g[f"{name}.cls_tokens"])
    assert_close(out[:, :, 1:], ref.tokens)
    assert_close(out[:, :, 0], ref.cls)  # slot 0: per-chunk patch mean averaged over chunks (REF's "cls")


def test_vqt_matches_ref(golden, model):
    g, _ = golden
    L, Q, D = g["vqt.param"].shape
    head = VQT(D, L, 5, num_queries=Q, norm_eps=1e-5).eval()  # REF's BEATs head LayerNorm: default eps
    head.load_state_dict({"queries": g["vqt.param"], "norm.weight": g["vqt.head.0.weight"],
                          "norm.bias": g["vqt.head.0.bias"], "fc.weight": g["vqt.head.2.weight"],
                          "fc.bias": g["vqt.head.2.bias"]})
    x = g["input.short"]
    with torch.no_grad():
        f = head.features(model, x)
        assert_close(head.head_input(f), g["vqt.head_input"])
        assert_close(head(f), g["vqt.logits"])
        assert torch.allclose(f.cls, model.forward_layers(x)[-1:, :, 0], atol=1e-6)  # queries change nothing else
        assert_close(head.head_input(head.features(model, g["input.long"])), g["vqt.long.head_input"])


def microsoft_checkpoint(golden, tmp_path, **changes):
    """Microsoft's layout: {'cfg': ..., 'model': ...}, the relative table under every block, a classifier."""
    g, meta = golden
    c = meta["small_config"]
    state = ref_state(g)
    state.update({"predictor.weight": torch.randn(527, c["dim"]), "predictor.bias": torch.zeros(527)})
    state.update(changes)
    cfg = {"encoder_layers": c["layers"], "encoder_embed_dim": c["dim"], "encoder_ffn_embed_dim": c["ffn"],
           "encoder_attention_heads": c["heads"], "embed_dim": c["embed"], "activation_fn": "gelu",
           "layer_norm_first": False, "deep_norm": True, "conv_pos": 128, "conv_pos_groups": 16,
           "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True,
           "finetuned_model": True, "predictor_class": 527}
    path = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    torch.save({"cfg": cfg, "model": state}, path)
    return path


def test_load_encoder_reads_microsoft_checkpoints(golden, model, tmp_path):
    enc = load_encoder(microsoft_checkpoint(golden, tmp_path))
    assert isinstance(enc, BEATs) and not enc.training
    assert enc.frontend_config == {"kind": "beats", "dataset": "audioset"}
    x = golden[0]["input.short"]
    with torch.no_grad():
        assert torch.equal(enc.forward_layers(x), model.forward_layers(x))
    # saved as this project's safetensors, it loads back (config in the metadata) with the same numbers
    save_encoder(tmp_path / "beats.safetensors", enc)
    again = load_encoder(tmp_path / "beats.safetensors")
    with torch.no_grad():
        assert isinstance(again, BEATs) and torch.equal(again.forward_layers(x), model.forward_layers(x))


def test_load_encoder_refuses_broken_beats_checkpoints(golden, tmp_path):
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    bad = microsoft_checkpoint(golden, tmp_path, **{key: torch.zeros(320, 4)})
    with pytest.raises(CheckpointError, match="relative position table"):
        load_encoder(bad)
    state = ref_state(golden[0])
    del state["encoder.layers.2.fc1.weight"]
    state["encoder.extra"] = torch.zeros(1)
    m = BEATs(small_config(golden[1]))
    with pytest.raises(CheckpointError, match="missing: encoder.layers.2.fc1.weight; unexpected: encoder.extra"):
        load_beats_state(m, state)


@pytest.mark.parametrize("kind", ["cgp", "h2t", "vqt"])
def test_beats_probe_file_round_trip(golden, model, tmp_path, kind):
    head = build_head(kind, model.dim, model.num_layers, 3, prototypes=8, use_cls=False).eval()
    probe = Probe(model, head, Frontend("beats", target_frames=256), ["a", "b", "c"], "multilabel").eval()
    save_probe(tmp_path / "probe.safetensors", probe)
    loaded = load_probe(tmp_path / "probe.safetensors")
    assert isinstance(loaded.encoder, BEATs) and loaded.frontend.config() == probe.frontend.config()
    wave = torch.randn(2, 41000) * 0.1
    assert torch.equal(loaded.predict(wave), probe.predict(wave))
