"""Loading and saving encoder weights: this project's safetensors, REF (BAT) checkpoints, EAT/SSLAM, BEATs.

Every format is mapped onto `bat.model.Encoder` key names (which are REF's) and loaded strictly:
a missing or unexpected encoder tensor is an error that lists the names. Silently half-loaded
checkpoints are the most expensive bug in probing work (REF's own loader prints a warning and goes
on with random weights when handed its own trainer's layout), so we refuse instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bat.beats import BEATs, BeatsConfig, is_beats_checkpoint, load_beats_checkpoint, load_beats_state
from bat.model import FREQ_PATCHES, Encoder, EncoderConfig, config_for, sincos_table

BAT_FRONTEND = {"kind": "bat"}
# EAT and SSLAM were pretrained on Kaldi fbanks normalised with AudioSet statistics.
LEGACY_FRONTEND = {"kind": "eat", "dataset": "audioset"}

# Fairseq (EAT/SSLAM) names -> ours. Everything under `blocks.` keeps its name.
EAT_KEY_MAP = {
    "modality_encoders.IMAGE.extra_tokens": "cls_token",
    "modality_encoders.IMAGE.local_encoder.proj.weight": "patch_embed.proj.weight",
    "modality_encoders.IMAGE.local_encoder.proj.bias": "patch_embed.proj.bias",
    "modality_encoders.IMAGE.fixed_positional_encoder.positions": "pos_embed",
    "modality_encoders.IMAGE.context_encoder.norm.weight": "pre_norm.weight",
    "modality_encoders.IMAGE.context_encoder.norm.bias": "pre_norm.bias",
}
# Parts of a pretraining checkpoint that are not the encoder (decoders, EMA teachers, projections).
# They are dropped on purpose; anything else that does not map onto the encoder is an error.
EAT_IGNORED = re.compile(r"^(_ema|ema\.|modality_encoders\.IMAGE\.decoder\.|shared_decoder\.|recon_proj\.|cls_proj\.)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: wrong format, missing/unexpected tensors, unsafe pickle."""


# --------------------------------------------------------------------------------------- saving

def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write to a temporary file and rename: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; make it an ordinary file
    os.replace(tmp, path)


def save_encoder(path, encoder: Encoder, frontend_config: dict | None = None, metadata: dict | None = None) -> None:
    """Save an encoder as safetensors; model and front-end configuration go into the metadata as JSON."""
    meta = {"format": "bat.encoder", "model_config": encoder.cfg.to_dict(),
            "frontend_config": frontend_config or getattr(encoder, "frontend_config", None) or BAT_FRONTEND}
    meta.update(metadata or {})
    atomic_save_safetensors(encoder.state_dict(), path, meta)


# --------------------------------------------------------------------------------------- reading

def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) with JSON metadata values decoded."""
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta


def torch_load(path, allow_pickle: bool = False):
    """torch.load that never runs pickled code unless the caller explicitly opts in."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError or RuntimeError here
        if not allow_pickle:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: checkpoint holds pickled Python objects that safe loading refuses ({first}); "
                "if you trust the file, pass allow_pickle=True (scripts: --allow-pickle)") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _is_tensor_dict(d) -> bool:
    return isinstance(d, dict) and d and all(isinstance(v, torch.Tensor) for v in d.values())


def encoder_state_from_checkpoint(obj, path="checkpoint") -> tuple[dict, dict]:
    """Find the student encoder in any supported checkpoint object. Returns (state, frontend_config).

    Supported: REF trainer layout {'encoder', 'decoder', 'ema_encoder', ...} (the *student* encoder:
    downstream use takes the student, not the EMA teacher), flat or nested under 'state_dict'
    `student.encoder.*` keys (REF's downstream loader, the released BAT_base.pt), a plain REF ViT
    state dict (a `head.*` is dropped), and fairseq EAT/SSLAM checkpoints ({'model': {...}}).
    """
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) and any(
            k.startswith("modality_encoders.IMAGE.") for k in obj["model"]):
        return _map_eat(obj["model"], path), dict(LEGACY_FRONTEND)
    if isinstance(obj, dict) and "encoder" in obj and isinstance(obj["encoder"], dict):
        return dict(obj["encoder"]), dict(BAT_FRONTEND)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path}: no encoder weights found (expected a state dict, REF or EAT/SSLAM checkpoint)")
    if any("student.encoder." in k for k in obj):
        state = {k.split("student.encoder.", 1)[1]: v for k, v in obj.items() if "student.encoder." in k}
        return state, dict(BAT_FRONTEND)
    obj = {k: v for k, v in obj.items() if not k.startswith("head.")}  # a classifier head is not the encoder
    for prefix in ("module.", "_orig_mod.", "encoder."):  # DDP / torch.compile / our probe and model files
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj, dict(BAT_FRONTEND)


def _map_eat(model: dict, path) -> dict:
    state, unexpected = {}, []
    for k, v in model.items():
        if k in EAT_KEY_MAP:
            state[EAT_KEY_MAP[k]] = v
        elif k.startswith("blocks."):
            state[k] = v
        elif k.startswith("modality_encoders.IMAGE.") and not EAT_IGNORED.match(k):
            unexpected.append(k)
        elif not EAT_IGNORED.match(k):
            unexpected.append(k)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors in EAT/SSLAM checkpoint: {', '.join(unexpected)}")
    return state


def infer_config(state: dict, num_heads: int | None = None) -> EncoderConfig:
    """Read width, depth, MLP ratio and gating from the weights; heads default to width / 64."""
    if "cls_token" not in state or "blocks.0.mlp.fc1.weight" not in state:
        raise CheckpointError("not an encoder state dict: cls_token or blocks.0.* missing")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    rows = state["pos_embed"].shape[1] if "pos_embed" in state else 64 * FREQ_PATCHES
    return EncoderConfig(dim=dim, depth=depth, num_heads=num_heads or max(dim // 64, 1), mlp_ratio=hidden / dim,
                         gated="blocks.0.attn.gate.weight" in state, chunk_patches=min(rows // FREQ_PATCHES, 64))


def build_encoder(model_config: dict):
    """An encoder with random weights from a saved `model_config` (BAT/EAT/SSLAM ViT or BEATs)."""
    if model_config.get("arch") == "beats":
        return BEATs(BeatsConfig(**model_config))
    return Encoder(EncoderConfig(**model_config))


def load_state_strict(encoder: Encoder, state: dict, path="checkpoint") -> None:
    if isinstance(encoder, BEATs):
        return load_beats_state(encoder, state, path)
    expected = encoder.state_dict()
    if "pos_embed" not in state:  # fixed table: a checkpoint may leave it out, we rebuild it
        state = {**state, "pos_embed": expected["pos_embed"]}
    if state["pos_embed"].shape[1] > expected["pos_embed"].shape[1]:
        state = {**state, "pos_embed": state["pos_embed"][:, : expected["pos_embed"].shape[1]]}  # as REF
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + (
            [f"unexpected: {', '.join(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path}: encoder tensors do not match ({'; '.join(parts)})")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes do not match: {', '.join(bad)}")
    # The positional table is fixed; a stored one that differs from the rebuilt sin-cos table means
    # the checkpoint was trained with other positions, so we keep the stored one (as REF does) and say so.
    rebuilt = sincos_table(encoder.cfg.dim, encoder.cfg.chunk_patches)[None]
    if not torch.allclose(state["pos_embed"].float(), rebuilt, atol=1e-4):
        print(f"note: {path}: stored positional table differs from the sin-cos table; using the stored one")
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_encoder(path, num_heads: int | None = None, allow_pickle: bool = False) -> Encoder:
    """An eval-mode Encoder from any supported file, or `random:tiny|small|base`.

    The returned module carries `.frontend_config` (a dict for `bat.frontend.Frontend.from_config`):
    the BAT front-end for BAT weights, the EAT Kaldi front-end for EAT/SSLAM checkpoints, the BEATs
    Kaldi front-end for Microsoft's BEATs checkpoints (`{'cfg': ..., 'model': ...}`, a `bat.beats.BEATs`).
    """
    path = str(path)
    if path.startswith("random:"):
        encoder = Encoder(config_for(path.split(":", 1)[1]))
        encoder.init_pretraining_weights()
        encoder.frontend_config = dict(BAT_FRONTEND)
        return encoder.eval()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        tensors, meta = read_safetensors(path)
        state, frontend = encoder_state_from_checkpoint(tensors, path)
        frontend = meta.get("frontend_config", frontend)
        if meta.get("model_config", {}).get("arch") == "beats":  # a BEATs encoder or probe saved by us
            encoder = build_encoder(meta["model_config"])
            load_beats_state(encoder, state, path)
            encoder.frontend_config = frontend
            return encoder.eval()
        cfg = EncoderConfig(**meta["model_config"]) if "model_config" in meta else infer_config(state, num_heads)
        if num_heads:
            cfg.num_heads = num_heads
    else:
        obj = torch_load(path, allow_pickle)
        if is_beats_checkpoint(obj):  # Microsoft's BEATs layout {'cfg': ..., 'model': ...}
            return load_beats_checkpoint(obj, path)
        state, frontend = encoder_state_from_checkpoint(obj, path)
        cfg = infer_config(state, num_heads)
    encoder = Encoder(cfg)
    load_state_strict(encoder, state, path)
    encoder.frontend_config = frontend
    return encoder.eval()
