"""What does each layer of an encoder know? Per-layer logistic-regression accuracy on sfx and drums,
next to the classical floor (per-mel-band mean + std over time, same classifier).

    python benchmarks/layer_probe.py random:tiny runs/pre/encoder.safetensors runs/pre/state.pt:teacher --sets DIR

For every encoder and every labelled set (SET/train.csv -> SET/test.csv), the first --seconds of each
clip go through the encoder once; each block's output is summarised per clip as [CLS, mean patch token]
and a multinomial logistic regression (full-batch L-BFGS on standardised features, fixed L2) is fitted
on the training clips and scored on the test clips. "all" concatenates every block's summary. Also
prints the spread of the features (std over clips, averaged over channels) per layer, and the share of
the pretraining targets the encoder would give as a teacher that is the same for every clip (its
positional pattern plus the average spectrogram): what a student can learn without listening.

Cheap (seconds per encoder on a CPU) and deterministic: the diagnostic behind the pretraining recipe
(benchmarks/README.md). It does not replace probe_cgp.py, which is what users run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bat.audio import SAMPLE_RATE, load_audio  # noqa: E402
from bat.checkpoint import load_encoder  # noqa: E402
from bat.frontend import spectrogram  # noqa: E402
from bat.listing import list_dataset  # noqa: E402
from bat.model import Encoder, config_for  # noqa: E402
from bat.pretraining import teacher_targets  # noqa: E402


def load_split(csv_path: Path, seconds: float, classes=None):
    """(spectrograms (M, 1, T, 128), frames per clip (M,), labels (M,), classes) of a labelled CSV."""
    items = list_dataset(str(csv_path))
    classes = classes or items.classes
    n = int(seconds * SAMPLE_RATE)
    frames = 16 * -(-(1 + n // 160) // 16)  # whole patches
    specs, valid = [], []
    for f in items.files:
        w = torch.from_numpy(load_audio(f, SAMPLE_RATE)[:n])
        specs.append(spectrogram(w[None], frames))
        valid.append(min(frames, 1 + len(w) // 160))
    return torch.cat(specs), torch.tensor(valid), torch.as_tensor(items.targets(classes)).long(), classes


def mel_stats(specs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The classical floor's features: mean and std of every mel band over the clip's own frames."""
    t = torch.arange(specs.shape[2])[None, :, None]
    m = (t < valid[:, None, None]).float()  # (M, T, 1)
    x = specs[:, 0]
    mean = (x * m).sum(1) / m.sum(1)
    var = ((x - mean[:, None]) ** 2 * m).sum(1) / m.sum(1)
    return torch.cat([mean, var.sqrt()], 1)


def logreg_accuracy(xtr, ytr, xte, yte, l2=1e-3, iters=200) -> float:
    """Multinomial logistic regression on standardised features (L-BFGS, L2 on the weights)."""
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    k = int(max(ytr.max(), yte.max())) + 1
    w = torch.zeros(xtr.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == yte).float().mean())


def load(path: str) -> Encoder:
    """An encoder file, random:SIZE, or DIR/state.pt:teacher for a pretraining run's EMA teacher."""
    if not path.endswith(":teacher"):
        return load_encoder(path)
    state = torch.load(path.removesuffix(":teacher"), map_location="cpu", weights_only=False)
    cfg = state["config"]
    encoder = Encoder(config_for(cfg["model"], chunk_patches=cfg["target_frames"] // 16))
    encoder.load_state_dict(state["ema_encoder"])
    return encoder.eval()


@torch.no_grad()
def shared_target_share(encoder, specs: torch.Tensor, frames: int = 256) -> float:
    """Share of the variance of the targets this encoder gives as a teacher (BAT's targets, uncentred)
    that is the same for every clip: 1 - var(target - its mean over clips at that position) / var."""
    t = torch.cat([teacher_targets(encoder, chunk[:, :, :frames]) for chunk in specs.split(32)])
    return float(1 - (t - t.mean(0, keepdim=True)).var() / t.var())


@torch.no_grad()
def layer_summaries(encoder, specs: torch.Tensor) -> torch.Tensor:
    """(L, M, 2D): every block's [CLS, mean patch token] per clip."""
    out = []
    for chunk in specs.split(32):
        h = encoder.forward_layers(chunk)  # (L, B, 1 + N, D)
        out.append(torch.cat([h[:, :, 0], h[:, :, 1:].mean(2)], -1))
    return torch.cat(out, 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("encoders", nargs="+", help="encoder files, random:tiny|small|base, or RUN/state.pt:teacher")
    p.add_argument("--sets", type=Path, default=Path("data"), help="folder holding sfx/ and drums/ (make_audio_sets.py)")
    p.add_argument("--names", nargs="+", default=["sfx", "drums"])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--cache", type=Path, default=None, help="keep the decoded spectrograms in this file")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.cache and args.cache.exists():
        data = torch.load(args.cache)
    else:
        data = {}
        for name in args.names:
            tr = load_split(args.sets / name / "train.csv", args.seconds)
            data[name] = (tr, load_split(args.sets / name / "test.csv", args.seconds, tr[3]))
        if args.cache:
            torch.save(data, args.cache)
    for name, (tr, te) in data.items():
        floor = logreg_accuracy(mel_stats(tr[0], tr[1]), tr[2], mel_stats(te[0], te[1]), te[2])
        print(f"{name}: {len(tr[2])} train / {len(te[2])} test clips; classical floor (mel mean+std + logreg) "
              f"{100 * floor:.1f}")
    results = {}
    for enc_path in args.encoders:
        torch.manual_seed(0)
        encoder = load(enc_path)
        pool = torch.cat([tr[0][:64] for tr, _ in data.values()])
        print(f"{enc_path}: share of its targets (as a teacher, 2.56 s) common to all clips "
              f"{shared_target_share(encoder, pool):.3f}", flush=True)
        for name, (tr, te) in data.items():
            ftr, fte = layer_summaries(encoder, tr[0]), layer_summaries(encoder, te[0])
            accs = [logreg_accuracy(ftr[i], tr[2], fte[i], te[2]) for i in range(len(ftr))]
            accs.append(logreg_accuracy(ftr.permute(1, 0, 2).flatten(1), tr[2], fte.permute(1, 0, 2).flatten(1), te[2]))
            spread = [float(f.std(0).mean()) for f in ftr]
            results[f"{enc_path}|{name}"] = {"acc": accs, "spread": spread}
            print(f"{enc_path:>40s} {name:6s} per layer " + " ".join(f"{100 * a:5.1f}" for a in accs[:-1])
                  + f" | all {100 * accs[-1]:5.1f} | spread " + " ".join(f"{s:.2f}" for s in spread), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
