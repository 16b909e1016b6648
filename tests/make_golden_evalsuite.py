"""Regenerate tests/golden/beats.* and tests/golden/vqt.* from the BAT reference implementation (REF).

    git clone https://github.com/houtan-ghaffari/BAT_ICML2026 /tmp/ref   # commit cc922820b437...
    python tests/make_golden_evalsuite.py /tmp/ref

REF (MIT licence) is imported, not copied: this script builds small models from REF's own classes,
randomises the parameters that default init leaves at 0/1, runs REF's feature extractors on CPU in
float32 and stores inputs, weights and outputs. Nothing of REF's source ends up in this repository.

- BEATs (REF models/beats.py): REF's BEATs class hard-codes the base size (embed 512, width 768,
  12 layers). To get a small model the module source is executed with those three constants
  replaced (embed 32, width 48, TransformerEncoder defaults 3 layers / 4 heads / FFN 96); every
  forward line is REF's. Stored: the state dict (`state.*`, REF/Microsoft key names), a short
  input (256 frames, one chunk) and a long one (1088 frames: a 64-patch chunk and a ragged 4-patch
  one), REF's feature cache for both (`*.patch_tokens` (L, B, D, T', F'), `*.cls_tokens` (L, B, D):
  the per-chunk mean of the patch tokens averaged over chunks) and REF's VQT features and logits
  (`vqt.*`, 2 query tokens per layer, head_norm, normalize_vqt) for the short input (and the head
  input for the long one).
- ViT VQT (REF models/vit.py, head='vqt'): dim 48, depth 3, 4 heads, 2 query tokens, head_norm;
  `head_input` (the normalised [CLS, queries] vector entering the head's LayerNorm) and logits for a 512-frame and a
  1088-frame input.
"""
import json
import re
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

REF_COMMIT = "cc922820b43788ade469ba75c37569741555c18a"
OUT = Path(__file__).resolve().parent / "golden"
BEATS_SMALL = dict(embed=32, dim=48, layers=3, heads=4, ffn=96)


def randomise(model, gen, scale=0.1):
    """LayerNorm affine, biases and BEATs' gru gate scale start at 0/1: perturb them so they matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "grep_a" in name or name.endswith("bias"):
                p.add_(scale * torch.randn(p.shape, generator=gen))


def small_beats_module(ref):
    src = (Path(ref) / "models" / "beats.py").read_text()
    e = BEATS_SMALL
    subs = [
        (r"self\.encoder_embed_dim = 768", f"self.encoder_embed_dim = {e['dim']}"),
        (r"self\.embed = 512", f"self.embed = {e['embed']}"),
        (r"encoder_layers=12,\s*encoder_embed_dim=768", f"encoder_layers={e['layers']}, encoder_embed_dim={e['dim']}"),
        (r"encoder_ffn_embed_dim=3072, encoder_attention_heads=12",
         f"encoder_ffn_embed_dim={e['ffn']}, encoder_attention_heads={e['heads']}"),
    ]
    for pat, rep in subs:
        src, n = re.subn(pat, rep, src)
        assert n == 1, f"REF beats.py changed: {pat!r} matched {n} times"
    mod = types.ModuleType("models.beats_small")
    mod.__package__ = "models"
    exec(compile(src, "models/beats.py (small)", "exec"), mod.__dict__)
    return mod


def beats_golden(ref, gen):
    beats = small_beats_module(ref)
    torch.manual_seed(0)
    model = beats.BEATs(head=None).eval()
    randomise(model, gen)
    short = torch.randn(2, 1, 256, 128, generator=gen)
    long = torch.randn(1, 1, 1088, 128, generator=gen)
    out = {f"state.{k}": v for k, v in model.state_dict().items()}
    out["input.short"], out["input.long"] = short, long
    with torch.no_grad():
        for name, x in (("short", short), ("long", long)):
            cache = model.extract_features_with_patch_tokens(x)
            out[f"{name}.patch_tokens"], out[f"{name}.cls_tokens"] = cache["patch_tokens"], cache["cls_tokens"]
    torch.manual_seed(1)
    vqt = beats.BEATs(num_classes=5, head="vqt", num_vqt=2, head_norm=True, head_dropout=0.2).eval()
    vqt.load_state_dict(model.state_dict(), strict=False)
    randomise(vqt.head, gen)
    with torch.no_grad():
        vqt.vqt.add_(0.3 * torch.randn(vqt.vqt.shape, generator=gen))  # REF's uniform init is tiny at D=48
        out["vqt.param"] = vqt.vqt.clone()
        out.update({f"vqt.head.{k}": v for k, v in vqt.head.state_dict().items()})
        out["vqt.head_input"] = vqt.extract_vqt_features(short)
        out["vqt.logits"] = vqt(short)
        out["vqt.long.head_input"] = vqt.extract_vqt_features(long)
    config = {"ref_commit": REF_COMMIT, "small_config": BEATS_SMALL,
              "constructor": "REF models/beats.py BEATs(head=None) with embed/width/layers/heads/FFN replaced "
                             "(see small_config); TransformerEncoder defaults otherwise (conv_pos 128, groups 16, "
                             "num_buckets 320, max_distance 800, gru_rel_pos, deep_norm)",
              "vqt_constructor": "BEATs(num_classes=5, head='vqt', num_vqt=2, head_norm=True, head_dropout=0.2), "
                                 "same encoder weights",
              "layout": "patch_tokens (L, B, D, T', F'=8), cls_tokens (L, B, D) = per-chunk patch mean, averaged "
                        "over chunks (torch.split(x, 64) along time patches)"}
    return out, config


def vit_vqt_golden(ref, gen):
    from models.vit import ViT

    out, config = {}, {"ref_commit": REF_COMMIT}
    for name, frames in (("short", 512), ("long", 1088)):
        torch.manual_seed(2)
        kw = dict(num_classes=5, input_shape=(frames, 128), dim=48, depth=3, num_heads=4, mlp_ratio=4,
                  use_gate=True, head="vqt", num_vqt=2, head_norm=True)
        model = ViT(**kw).eval()
        if name == "short":
            randomise(model, torch.Generator().manual_seed(3))
            with torch.no_grad():
                model.vqt.add_(0.3 * torch.randn(model.vqt.shape, generator=torch.Generator().manual_seed(4)))
            state = model.state_dict()
            out.update({f"state.{k}": v for k, v in state.items()})
            config["constructor"] = f"REF models/vit.py ViT({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
        model.load_state_dict(state)
        x = torch.rand(1 if name == "long" else 2, 1, frames, 128, generator=gen)
        out[f"input.{name}"] = x
        with torch.no_grad():
            out[f"{name}.head_input"] = model.extract_vqt_features(x)
            out[f"{name}.logits"] = model(x)
    return out, config


def save(name, tensors, config):
    tensors = {k: v.detach().float().clone() for k, v in tensors.items()}  # shared tensors saved apart
    save_file(tensors, str(OUT / f"{name}.safetensors"))
    config["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    (OUT / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT / name}.safetensors ({len(tensors)} tensors)")


def main(ref):
    sys.path.insert(0, str(Path(ref).resolve()))
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    save("beats", *beats_golden(ref, gen))
    save("vqt", *vit_vqt_golden(ref, gen))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
