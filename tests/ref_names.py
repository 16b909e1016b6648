"""REF's EAT/SSLAM (fairseq data2vec 2.0) checkpoint layout, read from the golden tests/golden/vit_b_keys.json
(`c_eat_sslam_fairseq`, written by running REF's loader models.builder.load_eat_audioset_pretrained_state).

The tests write their fake EAT/SSLAM checkpoints with these literal REF names, never by inverting
bat.checkpoint.EAT_KEY_MAP (the map under test): a typo in the map must make a test fail.
"""
import functools
import json
import re
from pathlib import Path

import torch

KEYS_FILE = Path(__file__).resolve().parent / "golden" / "vit_b_keys.json"
# REF crops a longer fairseq positional table to the ViT's rows (JSON: "[:, :model.pos_embed.shape[1]]")
ROW_CROP = "[:, :model.pos_embed.shape[1]]"


@functools.cache
def eat_layout() -> dict:
    """The JSON's EAT/SSLAM section, read when a test first needs it (so a golden set without it fails only the
    tests that build fairseq checkpoints, not the collection of their files)."""
    keys = json.loads(KEYS_FILE.read_text())
    if "c_eat_sslam_fairseq" not in keys:
        raise KeyError(f"{KEYS_FILE} has no c_eat_sslam_fairseq section (REF's EAT/SSLAM key map)")
    return keys["c_eat_sslam_fairseq"]


def eat_mapping() -> dict:
    """{ViT key: (fairseq key, the slice REF applies to it or '')} for every non-block tensor; REF copies
    `blocks.*` verbatim (checked here against the JSON's rule)."""
    out = {}
    for vit, expr in eat_layout()["mapping (ViT key <- checkpoint)"]:
        if vit == "blocks.{i}.<rest>":
            assert "copied verbatim" in expr, expr
            continue
        m = re.fullmatch(r"model\['([^']+)'\](.*)", expr)
        assert m, expr
        out[vit] = (m.group(1), m.group(2))
    return out


def block_suffixes() -> set:
    return set(eat_layout()["block_keys_the_ungated_ViT_expects_per_block"])


def fairseq_model(state: dict, extra_pos_rows: int = 8, seed: int = 0) -> dict:
    """An EAT/SSLAM checkpoint's `model` dict holding the ungated encoder `state` (REF ViT key names, no
    `attn.gate`) under REF's fairseq names. Where REF crops the positional table, the stored one gets
    `extra_pos_rows` rows of noise after the real ones (REF must drop them)."""
    mapping, blocks = eat_mapping(), block_suffixes()
    gen = torch.Generator().manual_seed(seed)
    model = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            assert k.split(".", 2)[2] in blocks, f"{k}: not a block tensor of REF's ungated ViT"
            model[k] = v.clone()
            continue
        name, rows = mapping[k]  # KeyError: an encoder tensor REF's EAT loader does not fill
        assert rows in ("", ROW_CROP), f"{k}: REF slices it as {rows!r}, which this helper does not know"
        if rows == ROW_CROP:
            v = torch.cat([v, torch.randn(1, extra_pos_rows, v.shape[-1], generator=gen)], dim=1)
        model[name] = v.clone()
    return model


def expected_encoder_state(model: dict, encoder_state: dict) -> dict:
    """What REF's loader puts into each tensor of a ViT whose state dict is `encoder_state` (for the table's
    row count), from the fairseq `model` dict, by REF's rules in the JSON."""
    mapping, out = eat_mapping(), {}
    for k, mine in encoder_state.items():
        if k.startswith("blocks."):
            out[k] = model[k]
            continue
        name, rows = mapping[k]
        out[k] = model[name][:, : mine.shape[1]] if rows == ROW_CROP else model[name]
    return out
