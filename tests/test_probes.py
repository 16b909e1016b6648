"""Probe heads against REF's golden heads, the REF state-dict conversion, training pieces, probe files."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bat.checkpoint import CheckpointError
from bat.frontend import Frontend
from bat.heads import CGP, LCGP, VQT, Features, Head2Toe, LinearProbe, ProtoBin, build_head, head_state_from_ref
from bat.losses import asymmetric_loss
from bat.model import Encoder, EncoderConfig
from bat.probes import Probe, load_probe, save_probe
from bat.optim import param_groups

ATOL, RTOL = 1e-5, 1e-4

# golden name -> our head (built from the config in heads.json)
GOLDEN_HEADS = {
    "cgp.clip_cls": lambda D, L, C, K: CGP(D, L, C, K, use_cls=True),
    "cgp.clip_nocls": lambda D, L, C, K: CGP(D, L, C, K, use_cls=False),
    "cgp.frame": lambda D, L, C, K: CGP(D, L, C, K, frame_wise=True),
    "lcgp.cls_ln": lambda D, L, C, K: LCGP(D, L, C, mode="cls", norm=True),
    "lcgp.patchavg": lambda D, L, C, K: LCGP(D, L, C, mode="patchavg", norm=False),
    "lcgp.frame_ln": lambda D, L, C, K: LCGP(D, L, C, mode="frame", norm=True),
    "linear.cls_ln": lambda D, L, C, K: LinearProbe(D, C, mode="cls", norm=True),
    "linear.patchavg": lambda D, L, C, K: LinearProbe(D, C, mode="patchavg", norm=False),
    "linear.frame_ln": lambda D, L, C, K: LinearProbe(D, C, mode="frame", norm=True),
    "protobin.clip": lambda D, L, C, K: ProtoBin(D, C, K),
    "protobin.frame": lambda D, L, C, K: ProtoBin(D, C, K, frame_wise=True),
    "h2t.cls_ln": lambda D, L, C, K: Head2Toe(D, L, C, mode="cls", norm=True),
}


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(str(golden_dir / "heads.safetensors")), json.loads((golden_dir / "heads.json").read_text())


def ref_state(tensors, name):
    prefix = f"{name}.state."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def close(a, b):
    return (a - b).abs().max().item() <= ATOL + RTOL * b.abs().max().item() and a.shape == b.shape


def golden_head(golden, name):
    """The REF head `name` with its golden weights, and the golden features."""
    tensors, meta = golden
    cfg = meta["config"]
    head = GOLDEN_HEADS[name](cfg["dim"], cfg["layers"], cfg["classes"], cfg["prototypes"])
    head.load_state_dict(head_state_from_ref(ref_state(tensors, name)), strict=True)
    return head, Features.from_ref(tensors["features.patch_tokens"], tensors["features.cls_tokens"])


@pytest.mark.parametrize("name", sorted(GOLDEN_HEADS))
def test_head_matches_ref(golden, name):
    tensors = golden[0]
    head, feats = golden_head(golden, name)
    head.eval()
    with torch.no_grad():
        fc_in, logits = head.pool(feats), head(feats)
    ref_in, ref_logits = tensors[f"{name}.fc_input"], tensors[f"{name}.logits"]
    assert fc_in.shape == ref_in.shape and logits.shape == ref_logits.shape
    # elementwise: max |ours - REF| <= atol + rtol |REF|
    assert ((fc_in - ref_in).abs() <= ATOL + RTOL * ref_in.abs()).all(), (fc_in - ref_in).abs().max()
    assert ((logits - ref_logits).abs() <= ATOL + RTOL * ref_logits.abs()).all(), (logits - ref_logits).abs().max()


@pytest.mark.parametrize("name", ["cgp.clip_cls", "cgp.clip_nocls"])
def test_cgp_training_path_matches_ref(golden, name):
    """With gradients on, CGP pools through its own min/max backward: the forward must still be REF's."""
    head, feats = golden_head(golden, name)
    fc_in, ref_in = head.pool(feats), golden[0][f"{name}.fc_input"]
    assert fc_in.requires_grad
    assert ((fc_in.detach() - ref_in).abs() <= ATOL + RTOL * ref_in.abs()).all()


@pytest.mark.parametrize("block", [1 << 21, 100])  # 100: one clip per block on the CPU
def test_cgp_min_max_gradient_is_autograds(monkeypatch, block):
    """The hand-written min/max backward gives autograd's gradients (winning token only) for the
    prototypes and the layer gate, whether the forward ran in one block or in many."""
    import bat.heads as heads
    monkeypatch.setattr(heads, "SIM_BLOCK", block)
    torch.manual_seed(0)
    L, B, N, D, K, C = 3, 5, 16, 8, 12, 4
    feats = Features(torch.randn(L, B, D), torch.randn(L, B, N, D), N // 8)
    head = CGP(D, L, C, K, dropout=0.0)
    with torch.no_grad():
        head.gate_logits.copy_(torch.randn(L))
    g = torch.randn(B, 3 * K)

    def plain_pool():  # REF's formula, differentiated by autograd
        a = head.gate_weights()
        p = torch.nn.functional.normalize(head.prototypes, dim=1)
        sim = heads.mix_normalised(feats.tokens, a) @ p.T
        mid = heads.mix_normalised(feats.cls, a) @ p.T
        return torch.stack([sim.min(1).values, mid, sim.max(1).values], dim=-1).flatten(1)

    grads = []
    for pool in (plain_pool, lambda: head.pool(feats)):
        head.zero_grad()
        out = pool()
        (out * g).sum().backward()
        grads.append((out.detach(), head.prototypes.grad.clone(), head.gate_logits.grad.clone()))
    (out0, gp0, ga0), (out1, gp1, ga1) = grads
    assert torch.allclose(out0, out1, atol=1e-6)
    assert gp0.abs().max() > 0 and ga0.abs().max() > 0
    assert torch.allclose(gp0, gp1, atol=1e-5, rtol=1e-4), (gp0 - gp1).abs().max()
    assert torch.allclose(ga0, ga1, atol=1e-5, rtol=1e-4), (ga0 - ga1).abs().max()


def test_protobin_max_gradient_is_autograds():
    """ProtoBin's max over tokens goes through the same sparse backward: autograd's gradient."""
    torch.manual_seed(0)
    feats = Features(None, torch.randn(1, 3, 16, 8), 2)
    head = ProtoBin(8, 4, 12, dropout=0.0)
    g = torch.randn(3, 12)

    def plain_pool():
        x = torch.nn.functional.normalize(feats.tokens[-1], dim=-1)
        p = torch.nn.functional.normalize(head.binary_prototypes(), dim=1)
        return (x @ p.T).max(1).values

    grads = []
    for pool in (plain_pool, lambda: head.pool(feats)):
        head.zero_grad()
        (pool() * g).sum().backward()
        grads.append(head.prototypes.grad.clone())
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_ref_conversion_maps_keys_and_shapes(golden):
    tensors, _ = golden
    ref = ref_state(tensors, "cgp.clip_cls")
    assert ref["prototype_vectors"].dim() == 4
    ours = head_state_from_ref({f"head.{k}": v for k, v in ref.items()})  # as stored inside a REF ViT
    assert set(ours) == {"prototypes", "gate_logits", "fc.weight", "fc.bias"}
    assert torch.equal(ours["prototypes"], ref["prototype_vectors"][:, :, 0, 0])
    assert torch.equal(ours["gate_logits"], ref["block_attention"])
    assert set(head_state_from_ref(ref_state(tensors, "lcgp.cls_ln"))) == {"gate_logits", "norm.weight",
                                                                          "norm.bias", "fc.weight", "fc.bias"}
    with pytest.raises(KeyError, match="vqt"):
        head_state_from_ref({"vqt.tokens": torch.zeros(1)})


@torch.no_grad()
def test_features_a_head_reads_match_ref_cache(golden_dir):
    """head.features (encoder.forward_layers -> Features.from_layers, the scripts' path) on REF's tiny ViT
    (encoder.safetensors) against REF's feature cache of the 1088-frame input (chunked: 64 + 4 time
    patches), for a head that reads every layer and tokens (CGP) and one that reads the last CLS only (LP)."""
    g = load_file(str(golden_dir / "encoder.safetensors"))
    enc = Encoder(EncoderConfig(dim=48, depth=3, num_heads=4)).eval()
    enc.load_state_dict({k[len("state."):]: v for k, v in g.items()
                         if k.startswith("state.") and not k.startswith("state.head.")}, strict=True)
    spec = torch.cat([g["input.main"][1:2], g["input.long_tail"]], dim=2)  # encoder.json's derived input.long
    ref = Features.from_ref(g["long.features.patch_tokens"], g["long.features.cls_tokens"])
    assert ref.tokens.shape == (3, 1, 68 * 8, 48)
    def near(a, b):  # the golden README's tolerance for encoder features: atol 1e-4, rtol 1e-4
        return a.shape == b.shape and ((a - b).abs() - 1e-4 * b.abs()).max().item() <= 1e-4

    f = CGP(48, 3, 5, 8).features(enc, spec)
    assert f.time_patches == 68 and near(f.tokens, ref.tokens) and near(f.cls, ref.cls)
    last = LinearProbe(48, 5, mode="cls").features(enc, spec)
    assert last.tokens is None and last.time_patches == 68 and near(last.cls, ref.cls[-1:])


def test_gate_is_convex_and_starts_uniform():
    for head in (CGP(16, 5, 3, 8), LCGP(16, 5, 3)):
        a = head.gate_weights()
        assert torch.allclose(a, torch.full((5,), 0.2)) and math.isclose(a.sum().item(), 1.0, rel_tol=1e-6)
        with torch.no_grad():
            head.gate_logits.copy_(torch.randn(5) * 3)
        assert (head.gate_weights() > 0).all() and math.isclose(head.gate_weights().sum().item(), 1.0, rel_tol=1e-6)
    assert LinearProbe(16, 3).gate_weights() is None


def test_gradients_reach_gate_prototypes_and_fc_only_through_the_head():
    torch.manual_seed(0)
    f = Features(torch.randn(4, 2, 16), torch.randn(4, 2, 24, 16), 3)
    for head in (CGP(16, 4, 3, 8), ProtoBin(16, 3, 8), LCGP(16, 4, 3)):
        head(f).sum().backward()
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (head.kind, name)
    # ProtoBin: forward sees only the signs (0 -> +1), backward passes straight through
    pb = ProtoBin(4, 2, 3)
    with torch.no_grad():
        pb.prototypes.copy_(torch.tensor([[0.0, -0.3, 2.0, 1e-9], [-1, -1, -1, -1], [5, 5, 5, 5.0]]))
    assert torch.equal(pb.binary_prototypes().detach(), torch.tensor([[1.0, -1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, 1]]))


def test_weight_decay_only_on_the_linear_weight():
    for head in (CGP(16, 4, 3, 8), LCGP(16, 4, 3), LinearProbe(16, 3), ProtoBin(16, 3, 8)):
        decay, rest = param_groups(head, 0.05)
        assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
        assert len(decay["params"]) == 1 and decay["params"][0] is head.fc.weight


def test_asymmetric_loss_matches_its_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4), (torch.rand(5, 4) > 0.5).float()
    p = logits.sigmoid()
    # gamma_pos 0: plain log-likelihood for positives; gamma_neg 1: negatives weighted by p
    expected = -(y * torch.log(p) + (1 - y) * p * torch.log(1 - p)).mean()
    assert torch.allclose(asymmetric_loss(logits, y), expected, atol=1e-6)
    # the weight carries no gradient (REF disable_torch_grad_focal_loss=True)
    logits.requires_grad_(True)
    asymmetric_loss(logits, y).backward()
    pd = logits.detach().sigmoid()
    grad = (y * -(1 - pd) + (1 - y) * pd * pd) / y.numel()
    assert torch.allclose(logits.grad, grad, atol=1e-6)


def tiny_probe(kind="cgp", classes=3):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=32, depth=2, num_heads=2)).eval()
    head = build_head(kind, 32, 2, classes, prototypes=8)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return Probe(enc, head.eval(), Frontend("bat", target_frames=32), [f"c{i}" for i in range(classes)], "multiclass")


@pytest.mark.parametrize("kind", ["cgp", "lcgp", "lp", "protobin", "h2t", "vqt"])
def test_probe_file_round_trip(tmp_path, kind):
    probe = tiny_probe(kind)
    save_probe(tmp_path / "probe.safetensors", probe)
    loaded = load_probe(tmp_path / "probe.safetensors")
    spec = probe.frontend(torch.randn(2, 4000) * 0.1)
    assert spec.shape == (2, 1, 32, 128)
    with torch.no_grad():
        assert torch.equal(loaded(spec), probe(spec))
    assert loaded.labels == probe.labels and loaded.task == "multiclass" and loaded.kind == kind
    assert loaded.frontend.config() == probe.frontend.config() and not loaded.training


def test_finetuned_model_file_loads_as_a_probe(tmp_path):
    # finetune.py saves encoder + LP head with save_probe(..., fmt="bat.model"): the same loader opens it
    probe = tiny_probe("lp")
    save_probe(tmp_path / "model.safetensors", probe, {"steps": 10}, fmt="bat.model")
    loaded = load_probe(tmp_path / "model.safetensors")
    assert loaded.metadata["format"] == "bat.model" and loaded.metadata["steps"] == 10
    spec = torch.rand(1, 1, 32, 128)
    with torch.no_grad():
        assert torch.equal(loaded(spec), probe(spec))


def test_load_probe_refuses_other_files(tmp_path):
    from bat.checkpoint import save_encoder

    save_encoder(tmp_path / "encoder.safetensors", Encoder(EncoderConfig(dim=32, depth=1, num_heads=2)))
    with pytest.raises(CheckpointError, match="not a probe"):
        load_probe(tmp_path / "encoder.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors file"):
        load_probe(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------- Head2Toe and VQT


def test_h2t_group_lasso_is_refs_penalty(golden):
    tensors, meta = golden
    cfg = meta["config"]
    head = Head2Toe(cfg["dim"], cfg["layers"], cfg["classes"], lasso_weight=1e-4)
    state = ref_state(tensors, "h2t.cls_ln")
    head.load_state_dict(head_state_from_ref(state))
    # REF: vector_norm(fc.weight, dim=0).sum() * group_scale, group_scale = sqrt(num_classes) (stored buffer)
    w = state["fc.weight"].double()
    expected = 1e-4 * state["group_scale"].double() * sum(w[:, j].norm() for j in range(w.shape[1]))
    assert math.isclose(head.penalty().item(), expected.item(), rel_tol=1e-6)
    head.penalty().backward()  # the penalty trains the Linear weight only
    assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0
    assert Head2Toe(8, 2, 3, lasso_weight=0).penalty() is None


@pytest.fixture(scope="module")
def vqt_golden(golden_dir):
    return load_file(str(golden_dir / "vqt.safetensors"))


def vit_vqt_from_ref(g):
    """Our Encoder + VQT head with the weights of REF's ViT(head='vqt') in tests/golden/vqt.*."""
    state = {k[6:]: v for k, v in g.items() if k.startswith("state.")}
    enc = Encoder(EncoderConfig(dim=48, depth=3, num_heads=4)).eval()
    enc.load_state_dict({k: v for k, v in state.items() if k not in ("vqt",) and not k.startswith("head.")})
    L, Q, D = state["vqt"].shape
    head = VQT(D, L, 5, num_queries=Q).eval()
    head.load_state_dict({"queries": state["vqt"], "norm.weight": state["head.0.weight"],
                          "norm.bias": state["head.0.bias"], "fc.weight": state["head.1.weight"],
                          "fc.bias": state["head.1.bias"]})
    return enc, head


@pytest.mark.parametrize("name", ["short", "long"])
def test_vqt_matches_ref_vit(vqt_golden, name):
    # short: one 32-patch chunk; long: 1088 frames = a 64-patch chunk and a ragged 4-patch one
    enc, head = vit_vqt_from_ref(vqt_golden)
    probe = Probe(enc, head, Frontend("bat"), [str(i) for i in range(5)], "multiclass").eval()
    x = vqt_golden[f"input.{name}"]
    with torch.no_grad():
        head_in, logits = head.head_input(head.features(enc, x)), probe(x)
    ref_in = vqt_golden[f"{name}.head_input"]
    assert close(head_in, ref_in), (head_in - ref_in).abs().max()
    assert close(logits, vqt_golden[f"{name}.logits"]), (logits - vqt_golden[f"{name}.logits"]).abs().max()


def test_vqt_queries_leave_the_sequence_unchanged_and_get_gradients():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=32, depth=2, num_heads=2)).eval().requires_grad_(False)
    head = VQT(32, 2, 3, num_queries=4)
    x = torch.rand(2, 1, 64, 128)
    layers, q = enc.forward_layers(x, queries=head.queries)
    assert q.shape == (2, 2, 4, 32)
    assert torch.allclose(layers, enc.forward_layers(x), atol=1e-6)  # REF: queries are never keys/values
    head(head.features(enc, x)).sum().backward()
    assert head.queries.grad is not None and head.queries.grad.abs().sum() > 0
    assert {n for n, p in enc.named_parameters() if p.grad is not None} == set()
