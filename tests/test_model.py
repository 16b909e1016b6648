"""Encoder parity with the reference implementation (golden fixtures) and checkpoint loading."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

import bat
from bat.checkpoint import CheckpointError, save_encoder
from bat.frontend import Frontend
from bat.heads import Features, build_head, head_state_from_ref
from bat.model import Encoder, EncoderConfig, config_for, count_parameters
from bat.probes import Probe
from ref_names import ROW_CROP, eat_mapping, expected_encoder_state, fairseq_model

CFG = dict(dim=48, depth=3, num_heads=4)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_file(golden_dir / "encoder.safetensors")


@pytest.fixture(scope="module")
def ref_state(golden):
    return {k[len("state."):]: v for k, v in golden.items() if k.startswith("state.") and not k.startswith("state.head.")}


def close(a, b, atol=1e-4, rtol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs() - rtol * b.abs()
    assert err.max().item() <= atol, f"max excess {err.max().item():.3g}"


def close_to_ref_cache(layers, golden, name, time_patches):
    """The Features a head reads from encoder.forward_layers output (Features.from_layers, the scripts' path)
    against REF's feature cache `name.features.*` (via Features.from_ref)."""
    ours = Features.from_layers(layers)
    ref = Features.from_ref(golden[f"{name}.features.patch_tokens"], golden[f"{name}.features.cls_tokens"])
    assert ours.time_patches == ref.time_patches == time_patches
    close(ours.cls, ref.cls)
    close(ours.tokens, ref.tokens)


def make_encoder(state, gated=True):
    enc = Encoder(EncoderConfig(**CFG, gated=gated)).eval()
    enc.load_state_dict(state, strict=True)
    return enc


def test_positional_table_matches_reference(ref_state):
    enc = Encoder(EncoderConfig(**CFG))
    close(enc.pos_embed, ref_state["pos_embed"], atol=1e-5, rtol=0)  # REF computes it in float32


@torch.no_grad()
def test_every_block_output_matches_reference(golden, ref_state):
    out = make_encoder(ref_state).forward_layers(golden["input.main"])
    assert out.shape == (3, 2, 513, 48)
    for layer in range(3):
        close(out[layer], golden[f"main.block_out.{layer}"])
    # REF stores main's cache CLS only; its patch_tokens are block_out[l][:, 1:] rearranged (encoder.json)
    f = Features.from_layers(out)
    assert f.time_patches == 64
    close(f.cls, golden["main.features.cls_tokens"])
    close(f.tokens, torch.stack([golden[f"main.block_out.{layer}"][:, 1:] for layer in range(3)]))


@torch.no_grad()
def test_short_input_512_frames(golden, ref_state):
    out = make_encoder(ref_state).forward_layers(golden["input.main"][0:1, :, :512])
    close_to_ref_cache(out, golden, "short", 32)


@torch.no_grad()
def test_long_input_is_chunked_like_reference(golden, ref_state):
    long = torch.cat([golden["input.main"][1:2], golden["input.long_tail"]], dim=2)  # 68 time patches
    out = make_encoder(ref_state).forward_layers(long)
    close_to_ref_cache(out, golden, "long", 68)


@torch.no_grad()
def test_long_batch_equals_per_example(golden, ref_state):
    enc = make_encoder(ref_state)
    x = torch.cat([golden["input.main"], golden["input.main"][:, :, :176]], dim=2)  # 75 time patches
    both = enc.forward_layers(x)
    for i in range(2):
        close(both[:, i : i + 1], enc.forward_layers(x[i : i + 1]), atol=1e-5)


@torch.no_grad()
def test_ungated_encoder_matches_reference(golden, ref_state):
    state = {k: v for k, v in ref_state.items() if ".attn.gate." not in k}
    out = make_encoder(state, gated=False).forward_layers(golden["input.main"][0:1, :, :512])
    close_to_ref_cache(out, golden, "ungated_short", 32)


@torch.no_grad()
def test_sdpa_equals_explicit_softmax(golden, ref_state):
    enc = make_encoder(ref_state)
    x = torch.cat([golden["input.main"][1:2], golden["input.long_tail"]], dim=2)
    fast = enc.forward_layers(x)
    for blk in enc.blocks:
        blk.attn.explicit_softmax = True
    close(fast, enc.forward_layers(x), atol=1e-5)


def golden_probe(golden, ref_state, gated=True):
    """REF's ViT with its CGP head as probe_cgp.py builds it (bat.heads.build_head with the golden config),
    loaded with the golden encoder state and REF's head state through bat's converter."""
    state = ref_state if gated else {k: v for k, v in ref_state.items() if ".attn.gate." not in k}
    head = build_head("cgp", dim=48, num_layers=3, num_classes=5, prototypes=32, dropout=0.2, use_cls=True)
    head.load_state_dict(head_state_from_ref({k[len("state."):]: v for k, v in golden.items()
                                              if k.startswith("state.head.")}), strict=True)
    return Probe(make_encoder(state, gated), head, Frontend.from_config({"kind": "bat"}), list("abcde"),
                 "multilabel").eval()


@torch.no_grad()
@pytest.mark.parametrize("case", ["main", "short", "long", "ungated_short"])
def test_end_to_end_logits_match_reference(golden, ref_state, case):
    """spectrogram -> encoder.forward_layers -> Features.from_layers -> CGP head, against REF's ViT logits."""
    spec = {"main": golden["input.main"], "short": golden["input.main"][0:1, :, :512],  # encoder.json's
            "ungated_short": golden["input.main"][0:1, :, :512],                          # derived_inputs
            "long": torch.cat([golden["input.main"][1:2], golden["input.long_tail"]], dim=2)}[case]
    probe = golden_probe(golden, ref_state, gated=case != "ungated_short")
    close(probe(spec), golden[f"{case}.logits"], atol=1e-5, rtol=1e-4)
    close(probe.head.gate_weights(), golden["gate_softmax"], atol=1e-5, rtol=1e-4)


def test_sizes():
    base = Encoder(config_for("base"))
    assert abs(count_parameters(base) - 92_341_248) < 1000  # spec: ~92.3 M trainable with gates
    assert Encoder(config_for("small")).cfg.dim == 384
    with pytest.raises(ValueError, match="unknown model size"):
        config_for("huge")


# ------------------------------------------------------------------------------ checkpoint loading

def eat_checkpoint(state):
    """A fairseq EAT/SSLAM checkpoint holding the golden (ungated) weights under REF's fairseq names (from
    tests/golden/vit_b_keys.json, not from bat's map), with a positional table longer than the ViT's."""
    model = fairseq_model({k: v for k, v in state.items() if ".attn.gate." not in k})
    model["modality_encoders.IMAGE.decoder.proj.weight"] = torch.zeros(3, 3)  # pretraining-only, ignored
    model["_ema"] = torch.zeros(1)
    return {"model": model}


@torch.no_grad()
@pytest.mark.parametrize("layout", ["trainer", "flat", "nested", "plain_with_head"])
def test_ref_checkpoint_layouts_load(tmp_path, golden, ref_state, layout):
    student = {k: v.clone() for k, v in ref_state.items()}
    if layout == "trainer":
        teacher = {k: torch.zeros_like(v) for k, v in student.items()}
        ckpt = {"encoder": student, "decoder": {"mask_token": torch.zeros(1, 1, 48)},
                "ema_encoder": teacher, "optimized_steps": 7, "args": {"lr": 5e-4}}
    elif layout == "flat":
        ckpt = {f"student.encoder.{k}": v for k, v in student.items()}
    elif layout == "nested":
        ckpt = {"state_dict": {f"student.encoder.{k}": v for k, v in student.items()}}
    else:
        ckpt = {**student, **{k[len("state."):]: v for k, v in golden.items() if k.startswith("state.head.")}}
    path = tmp_path / "ref.pt"
    torch.save(ckpt, path)
    enc = bat.load_encoder(path, num_heads=4)
    assert enc.cfg.gated and enc.cfg.depth == 3 and not enc.training
    assert enc.frontend_config["kind"] == "bat"
    close(enc.forward_layers(golden["input.main"])[2], golden["main.block_out.2"])


@torch.no_grad()
def test_eat_checkpoint_loads_ungated(tmp_path, golden, ref_state):
    path = tmp_path / "eat.pt"
    torch.save(eat_checkpoint(ref_state), path)
    enc = bat.load_encoder(path, num_heads=4)
    assert not enc.cfg.gated
    assert enc.frontend_config["kind"] == "eat"
    # every tensor REF's loader fills, by its names and rules, holds what the checkpoint stored
    model, mine = torch.load(path)["model"], enc.state_dict()
    want = expected_encoder_state(model, mine)
    assert set(want) == set(mine) and len(mine) == 6 + 12 * 3
    assert {name for name, _ in eat_mapping().values()} <= set(model)  # every REF name of the JSON was written
    for k in mine:
        assert torch.equal(mine[k], want[k]), k
    # REF crops the fairseq positional table (longer here) to the ViT's rows
    name, rows = eat_mapping()["pos_embed"]
    assert rows == ROW_CROP and model[name].shape[1] > mine["pos_embed"].shape[1]
    assert torch.equal(mine["pos_embed"], model[name][:, :512])
    out = enc.forward_layers(golden["input.main"][0:1, :, :512])
    close(out[:, :, 0], golden["ungated_short.features.cls_tokens"])


@pytest.mark.parametrize("fault", ["missing", "extra"])
def test_strict_loading_names_the_tensor(tmp_path, ref_state, fault):
    state = {f"student.encoder.{k}": v for k, v in ref_state.items()}
    if fault == "missing":
        del state["student.encoder.blocks.1.mlp.fc2.bias"]
        name = "blocks.1.mlp.fc2.bias"
    else:
        state["student.encoder.blocks.0.unexpected_extra"] = torch.zeros(2)
        name = "blocks.0.unexpected_extra"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"{fault if fault == 'missing' else 'unexpected'}: .*{name}"):
        bat.load_encoder(tmp_path / "bad.pt", num_heads=4)


def test_eat_extra_block_tensor_is_refused(tmp_path, ref_state):
    ckpt = eat_checkpoint(ref_state)
    ckpt["model"]["blocks.0.unexpected_extra"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "eat.pt")
    with pytest.raises(CheckpointError, match="blocks.0.unexpected_extra"):
        bat.load_encoder(tmp_path / "eat.pt", num_heads=4)


class Opaque:  # anything that needs full unpickling
    pass


def test_pickled_objects_need_explicit_opt_in(tmp_path, ref_state):
    ckpt = eat_checkpoint(ref_state)
    ckpt["cfg"] = Opaque()
    torch.save(ckpt, tmp_path / "eat.pt")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        bat.load_encoder(tmp_path / "eat.pt", num_heads=4)
    enc = bat.load_encoder(tmp_path / "eat.pt", num_heads=4, allow_pickle=True)
    assert not enc.cfg.gated


def test_fairseq_config_of_a_missing_module_loads_with_stand_ins(tmp_path, ref_state, monkeypatch):
    """Real EAT/SSLAM files pickle fairseq/omegaconf config objects: with allow_pickle the tensors load and
    those objects become inert stand-ins, even when their module cannot be imported here."""
    import sys
    import types

    fake = types.ModuleType("fairseq_not_installed_configs")
    cfg_cls = type("FairseqConfig", (), {"__module__": fake.__name__})
    fake.FairseqConfig = cfg_cls
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    cfg = cfg_cls()
    cfg.model = {"_name": "data2vec_multi", "embed_dim": 64}
    ckpt = eat_checkpoint(ref_state)
    ckpt["cfg"] = cfg
    torch.save(ckpt, tmp_path / "eat.pt")
    monkeypatch.delitem(sys.modules, fake.__name__)  # now the class is nowhere to be imported
    with pytest.raises(ModuleNotFoundError):
        torch.load(tmp_path / "eat.pt", weights_only=False)
    obj = bat.checkpoint.torch_load(tmp_path / "eat.pt", allow_pickle=True)
    assert isinstance(obj["cfg"], bat.checkpoint.StandIn) and obj["cfg"].state["model"]["embed_dim"] == 64
    enc = bat.load_encoder(tmp_path / "eat.pt", num_heads=4, allow_pickle=True)
    assert not enc.cfg.gated and enc.cfg.dim == ref_state["cls_token"].shape[-1]
    with pytest.raises(CheckpointError, match="allow_pickle=True"):  # still refused without the opt-in
        bat.load_encoder(tmp_path / "eat.pt", num_heads=4)


def test_stand_in_unpickler_runs_no_pickled_callable(tmp_path):
    """A pickle whose reduce calls os.system gets a stand-in called instead: nothing runs."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    obj = bat.checkpoint.torch_load(path, allow_pickle=True)
    assert torch.equal(obj["w"], torch.ones(2)) and isinstance(obj["x"], bat.checkpoint.StandIn)
    assert not (tmp_path / "ran").exists()


@torch.no_grad()
def test_own_format_round_trip(tmp_path, golden):
    enc = bat.load_encoder("random:tiny")
    frontend = {"kind": "bat", "target_frames": 512}
    save_encoder(tmp_path / "encoder.safetensors", enc, frontend, metadata={"step": 3})
    again = bat.load_encoder(tmp_path / "encoder.safetensors")
    assert again.cfg == enc.cfg and again.frontend_config == frontend
    x = golden["input.main"][:, :, :256]
    assert torch.equal(enc.forward_layers(x), again.forward_layers(x))
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        bat.load_encoder(tmp_path / "nope.pt")


def test_probe_file_loads_as_encoder(tmp_path):
    """A probe.safetensors / model.safetensors (encoder.* + head.*) is accepted wherever an encoder is."""
    from bat.frontend import Frontend
    from bat.heads import LinearProbe
    from bat.probes import Probe, save_probe

    enc = bat.load_encoder("random:tiny")
    probe = Probe(enc, LinearProbe(enc.dim, 3), Frontend("bat"), labels=["a", "b", "c"], task="multiclass")
    save_probe(tmp_path / "probe.safetensors", probe)
    again = bat.load_encoder(tmp_path / "probe.safetensors")
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        assert torch.equal(enc.forward_layers(x), again.forward_layers(x))


def test_bytes_that_are_no_checkpoint_are_not_sent_to_allow_pickle(tmp_path):
    # torch's weights-only loader reports random bytes as a refused pickle; advising --allow-pickle would be wrong
    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "notes.pt").write_text("these are not weights\n" * 20)
    (tmp_path / "hello.pt").write_text("hello\n")  # 'h' reads as a pickle memo lookup: torch raised KeyError(101)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, why in (("noise.pt", "neither a zip archive nor a pickle"), ("notes.pt", "neither a zip archive"),
                      ("hello.pt", r"neither a zip archive nor a pickle\)$"), ("empty.pt", r"an empty file\)$")):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
            bat.load_encoder(tmp_path / name)
        assert re.search(why, str(info.value)), str(info.value)
        assert "allow" not in str(info.value) and "\n" not in str(info.value)


def test_a_stored_positional_table_is_kept_and_said_once_under_torchrun(tmp_path, monkeypatch, capsys):
    enc = Encoder(EncoderConfig(dim=32, depth=1, num_heads=1)).eval()
    with torch.no_grad():
        enc.pos_embed.add_(0.5)  # trained with other positions than the sin-cos table
    save_encoder(tmp_path / "e.safetensors", enc)
    import bat.distributed

    monkeypatch.setattr(bat.distributed, "is_main", lambda: False)  # another process of the run: quiet
    assert torch.equal(bat.load_encoder(tmp_path / "e.safetensors").pos_embed, enc.pos_embed)
    assert "positional table" not in capsys.readouterr().out
    monkeypatch.undo()
    bat.load_encoder(tmp_path / "e.safetensors")
    assert "stored positional table differs from the sin-cos table; using the stored one" in capsys.readouterr().out


def test_eval_mode_gives_every_submodule_its_own_mode_back_errors_included():
    from bat.model import eval_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    net.train()
    net[2].eval()  # mixed modes, as a Probe with a frozen encoder and a training head
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("scoring failed")
    assert [m.training for m in net.modules()] == [True, True, True, False, False]
