"""Loading and saving encoder weights: this project's safetensors, REF (BAT) checkpoints, EAT/SSLAM, BEATs.

Every format is mapped onto `bat.model.Encoder` key names (which are REF's) and loaded strictly:
a missing or unexpected encoder tensor is an error that lists the names. Silently half-loaded
checkpoints are the most expensive bug in probing work (REF's own loader prints a warning and goes
on with random weights when handed its own trainer's layout), so we refuse instead.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import save

from bat.beats import BEATs, BeatsConfig
from bat.distributed import print0
from bat.files import atomic_write, first_line, partial_path
from bat.model import FREQ_PATCHES, SIZES, Encoder, EncoderConfig, config_for, sincos_table

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
    """Write a safetensors file atomically: a crash or kill mid-write leaves the previous file intact.

    The bytes go to `.NAME.partial` next to the file, then a rename. We serialise in memory and write
    the file ourselves: safetensors' save_file writes through a randomly named `.tmpXXXXXX` of its own,
    which a killed run leaves behind (370 MB for a base encoder) and no later run can know is ours.
    A `.NAME.partial` left by a kill is overwritten by the next save of NAME.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    data = save(tensors, metadata=meta)
    try:
        with atomic_write(path) as fh:  # an error removes the partial file; `path` keeps its old bytes
            fh.write(data)
    except OSError as e:
        if e.filename and e.filename != str(partial_path(path)):  # names its cause (a folder that cannot be made)
            raise
        # A write or fsync error (a full disk: "[Errno 28] No space left on device") names no file: give it
        # the file, which the scripts' error line then shows as "PATH: reason" (bat.cli.error_exit).
        raise OSError(e.errno, e.strerror or first_line(e), str(path)) from None


def save_encoder(path, encoder: Encoder, frontend_config: dict | None = None, metadata: dict | None = None) -> None:
    """Save an encoder as safetensors; model and front-end configuration go into the metadata as JSON."""
    meta = {"format": "bat.encoder", "model_config": encoder.cfg.to_dict(),
            "frontend_config": frontend_config or getattr(encoder, "frontend_config", None) or BAT_FRONTEND}
    meta.update(metadata or {})
    atomic_save_safetensors(encoder.state_dict(), path, meta)


# --------------------------------------------------------------------------------------- reading

# Metadata this project writes as JSON and reads back as structure: anything else in them is a bad file.
JSON_METADATA = {"model_config": dict, "frontend_config": dict, "head_config": dict, "labels": list}


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) with JSON metadata values decoded. A file that is not safetensors, is
    truncated, or whose configuration metadata is not JSON raises CheckpointError naming the file."""
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... for fake and truncated files
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v  # free-text metadata of other tools
        if k in JSON_METADATA and not isinstance(meta[k], JSON_METADATA[k]):
            raise CheckpointError(f"{path}: metadata {k!r} is not a JSON {JSON_METADATA[k].__name__} "
                                  f"(got {v[:60]!r}); the file was not written by this project or is damaged")
    return tensors, meta


def _unpickler_reason(e: BaseException) -> str:
    """The line of torch's weights-only error that names what it stumbled on ("Unsupported operand 54")."""
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))
    if found:
        return found.group(0)
    lines = [ln.strip() for ln in str(e).split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()]
    return lines[0] if lines else first_line(e)


class StandIn:
    """What a pickled object of a class that the stand-in unpickler does not import becomes (fairseq's and
    omegaconf's configs, argparse namespaces, ...): it keeps the arguments and state it was given, so the
    checkpoint's tensors load without the library that wrote it."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"StandIn({type(self).__module__}.{type(self).__qualname__})"


def _stand_in(module: str, name: str) -> type:
    return type(name, (StandIn,), {"__module__": module, "__qualname__": name})


# The real objects the stand-in unpickler builds: tensors and their storages, dtypes, and plain containers.
_REAL = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
         ("builtins", "complex"), ("builtins", "bytearray"), ("numpy", "dtype"), ("numpy", "ndarray"),
         ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
         ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class StandInUnpickler(pickle.Unpickler):
    """Builds tensors, storages, dtypes and containers for real and everything else as a StandIn: it runs
    no pickled callable of any other library and needs neither fairseq nor omegaconf installed."""

    def find_class(self, module, name):
        if (module, name) in _REAL:
            return super().find_class(module, name)
        if module == "torch" or module.startswith("torch."):
            obj = super().find_class(module, name)
            if isinstance(obj, (type, torch.dtype)) or name.startswith("_rebuild_"):  # storages, Size, rebuilders
                return obj
        return _stand_in(module, name)


class _StandInPickle:  # the pickle_module torch.load takes
    Unpickler = StandInUnpickler
    load = staticmethod(lambda f, **kw: StandInUnpickler(f, **kw).load())


def torch_load(path, allow_pickle: bool = False):
    """torch.load that never runs pickled code. Pickled objects other than tensors are refused, or with
    allow_pickle become StandIn objects (StandInUnpickler): EAT/SSLAM files load without fairseq."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a pickled object (or the pickle is torn)
        if "Unsupported operand" in str(e):  # not pickled objects: bytes that are no pickle at all
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a "
                                  f"pickle: {_unpickler_reason(e)})") from None
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: checkpoint holds pickled Python objects that safe loading refuses ({_unpickler_reason(e)}); "
                "if you trust the file, pass allow_pickle=True (scripts: --allow-pickle)") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, not a checkpoint at all, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_load_failure(path, e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StandInPickle)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None


def _load_failure(path, error: Exception) -> str:
    """Why torch.load failed, in words: bytes that are not torch's zip format go to its old pickle reader,
    whose opcode errors (KeyError 101, "pop from empty list", ...) say nothing about the file."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "an empty file"
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        return "neither a zip archive nor a pickle"
    return first_line(error)  # a torn zip, a folder, ...


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


def infer_config(state: dict, num_heads: int | None = None, path="checkpoint") -> EncoderConfig:
    """Read width, depth, MLP ratio and gating from the weights; heads default to width / 64."""
    if "cls_token" not in state or "blocks.0.mlp.fc1.weight" not in state:
        raise CheckpointError(f"{path}: not an encoder state dict (cls_token or blocks.0.* missing)")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    rows = state["pos_embed"].shape[1] if "pos_embed" in state else 64 * FREQ_PATCHES
    return EncoderConfig(dim=dim, depth=depth, num_heads=num_heads or max(dim // 64, 1), mlp_ratio=hidden / dim,
                         gated="blocks.0.attn.gate.weight" in state, chunk_patches=min(rows // FREQ_PATCHES, 64))


def build_encoder(model_config, path="checkpoint", num_heads: int | None = None):
    """An encoder with random weights from a saved `model_config` (BAT/EAT/SSLAM ViT or BEATs);
    CheckpointError naming `path` when the metadata does not describe one."""
    try:
        if model_config.get("arch") == "beats":
            return BEATs(BeatsConfig(**model_config))
        cfg = EncoderConfig(**model_config)
        if num_heads:
            cfg.num_heads = num_heads
        return Encoder(cfg)
    except Exception as e:  # noqa: BLE001 - unknown keys, a width the head count does not divide, ...
        raise CheckpointError(f"{path}: metadata 'model_config' does not describe an encoder ({first_line(e)})") from None


# ---------------------------------------------- Microsoft's BEATs checkpoints (bat.beats.BEATs)


def is_beats_checkpoint(obj) -> bool:
    """Microsoft's layout: {'cfg': {...}, 'model': state dict with patch_embedding / encoder.layers}."""
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("cfg"), dict)
            and "patch_embedding.weight" in obj["model"])


def beats_state(model: dict, path="checkpoint") -> dict:
    """A BEATs state dict in bat.beats.BEATs's keys: the classifier of fine-tuned (AS2M) checkpoints
    (`predictor.*`) is dropped; blocks 1.. share block 0's relative position table (REF and Microsoft
    store it under every block), so those copies are checked equal to block 0's and dropped."""
    state = {}
    first = model.get("encoder.layers.0.self_attn.relative_attention_bias.weight")
    for k, v in model.items():
        if k.startswith("predictor"):
            continue
        if k.endswith("self_attn.relative_attention_bias.weight") and not k.startswith("encoder.layers.0."):
            if first is None or v.shape != first.shape or not torch.equal(v, first):
                raise CheckpointError(f"{path}: {k} differs from block 0's shared relative position table")
            continue
        state[k] = v
    return state


def load_beats_state(encoder: BEATs, state: dict, path="checkpoint") -> None:
    """Strict load: every tensor present, none left over, shapes equal; errors name the tensors."""
    state = beats_state(state, path)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: BEATs tensors do not match (missing: {', '.join(missing) or '-'}; "
                              f"unexpected: {', '.join(unexpected) or '-'})")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: BEATs tensor shapes do not match: {', '.join(bad)}")
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_beats_checkpoint(obj: dict, path="checkpoint") -> BEATs:
    """An eval-mode BEATs from Microsoft's checkpoint dict (iter3 / iter3+ AS2M and the like)."""
    try:
        cfg = BeatsConfig.from_checkpoint_cfg(obj["cfg"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    encoder = BEATs(cfg)
    load_beats_state(encoder, obj["model"], path)
    return encoder.eval()


# ----------------------------------------------------------------------------- loading strictly


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
        print0(f"note: {path}: stored positional table differs from the sin-cos table; using the stored one")
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def load_encoder(path, num_heads: int | None = None, allow_pickle: bool = False) -> Encoder:
    """An eval-mode Encoder from any supported file, or `random:tiny|small|base`.

    The returned module carries `.frontend_config` (a dict for `bat.frontend.Frontend.from_config`):
    the BAT front-end for BAT weights, the EAT Kaldi front-end for EAT/SSLAM checkpoints, the BEATs
    Kaldi front-end for Microsoft's BEATs checkpoints (`{'cfg': ..., 'model': ...}`, a `bat.beats.BEATs`).
    Any file that cannot be loaded raises CheckpointError with a one-line message naming it.
    """
    path = str(path)
    if path.startswith("random:"):
        size = path.split(":", 1)[1]
        if size not in SIZES:
            raise CheckpointError(f"{path}: unknown model size {size!r}; use one of "
                                  f"{', '.join('random:' + s for s in SIZES)}")
        encoder = Encoder(config_for(size))
        encoder.init_pretraining_weights()
        encoder.frontend_config = dict(BAT_FRONTEND)
        return encoder.eval()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    if path.endswith(".safetensors"):
        tensors, meta = read_safetensors(path)
        state, frontend = encoder_state_from_checkpoint(tensors, path)
        frontend = meta.get("frontend_config", frontend)
        if "model_config" in meta:
            encoder = build_encoder(meta["model_config"], path, num_heads)
        else:
            encoder = build_encoder(infer_config(state, num_heads, path).to_dict(), path)
    else:
        obj = torch_load(path, allow_pickle)
        if is_beats_checkpoint(obj):  # Microsoft's BEATs layout {'cfg': ..., 'model': ...}
            return load_beats_checkpoint(obj, path)
        state, frontend = encoder_state_from_checkpoint(obj, path)
        encoder = build_encoder(infer_config(state, num_heads, path).to_dict(), path)
    load_state_strict(encoder, state, path)
    encoder.frontend_config = frontend
    return encoder.eval()
