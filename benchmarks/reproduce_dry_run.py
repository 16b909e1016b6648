"""Dry-run of the README's "Reproducing the paper" commands on tiny generated copies of every layout.

    python benchmarks/reproduce_dry_run.py                 # every command of the README block
    python benchmarks/reproduce_dry_run.py --models BAT_base.pt --keep /tmp/dry

Builds, in a scratch folder, REF's AudioSet layout (segment lists, ontology.json, Y<id>.wav), an ESC-50
repository folder and a Speech Commands v2 folder (a few short clips each), and the three checkpoints the
README names with random tiny weights in their real formats (BAT_base.pt: REF's `student.encoder.*` layout;
EAT and SSLAM: fairseq layout with a pickled config). Then it runs the README's bash block as it is, with one
change: `python` is a shell function that appends `--steps 2 --batch-size 4 --workers 0` (and `--prototypes 8`
for probes), so every command runs end to end in seconds. Prints one line per run (task, metric, seconds)
and the total; exits non-zero if any command failed. The numbers are from random weights: they check the
commands, not the models.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bat.checkpoint import EAT_KEY_MAP  # noqa: E402
from bat.model import Encoder, config_for  # noqa: E402

SHIM = """python() {
  local extra=(--steps 2 --batch-size 4 --workers 0)
  case "$1" in probe_cgp.py) extra+=(--prototypes 8);; -m) extra=();; esac
  command "$PYTHON" "$@" "${extra[@]}"
}
"""


def tone(seconds, f, seed):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def write(path, x):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x, 16000)


def make_checkpoints(d):
    torch.manual_seed(0)
    bat = Encoder(config_for("tiny"))
    os.makedirs(d, exist_ok=True)
    torch.save({"state_dict": {f"student.encoder.{k}": v for k, v in bat.state_dict().items()}},
               os.path.join(d, "BAT_base.pt"))
    inv = {v: k for k, v in EAT_KEY_MAP.items()}
    for name in ("EAT-base_epoch10_pt.pt", "sslam.pt"):
        eat = Encoder(config_for("tiny", gated=False))
        model = {inv.get(k, k): v for k, v in eat.state_dict().items()}
        torch.save({"model": model, "cfg": argparse.Namespace(task="pretraining")}, os.path.join(d, name))


def make_audioset(d):
    classes = {"/m/a": "Speech", "/m/b": "Music", "/m/c": "Dog"}
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "ontology.json"), "w") as fh:
        json.dump([{"id": k, "name": v} for k, v in classes.items()], fh)
    ids = list(classes)
    for split, n in (("balanced_train_segments", 6), ("unbalanced_train_segments", 8), ("eval_segments", 4)):
        lines = ["# Segments csv", "# num_ytids=...", "# YTID, start_seconds, end_seconds, positive_labels"]
        for i in range(n):
            ytid = f"{split[:3]}{i:08d}"
            labels = [ids[i % 3]] + ([ids[(i + 1) % 3]] if i % 2 else [])
            write(os.path.join(d, split, f"Y{ytid}.wav"), tone(1.0 + 0.5 * (i % 3), 200 * (1 + i % 3), i))
            lines.append(f'{ytid}, 0.000, 10.000, "{",".join(labels)}"')
        with open(os.path.join(d, f"{split}.csv"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


def make_esc50(d):
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for k, cat in enumerate(("dog", "rain")):
            name = f"{fold}-{k}-A-{k}.wav"
            write(os.path.join(d, "audio", name), tone(2.0, 300 + 500 * k, fold * 10 + k))
            rows.append(f"{name},{fold},{k},{cat},True,{k},A")
    os.makedirs(os.path.join(d, "meta"), exist_ok=True)
    with open(os.path.join(d, "meta", "esc50.csv"), "w") as fh:
        fh.write("\n".join(rows) + "\n")


def make_scv2(d):
    val, test = [], []
    for w, word in enumerate(("yes", "no", "bird")):
        for k in range(4):
            write(os.path.join(d, word, f"{k}.wav"), tone(1.0, 300 + 300 * w, 100 * w + k))
        val.append(f"{word}/0.wav")
        test.append(f"{word}/1.wav")
    write(os.path.join(d, "_background_noise_", "noise.wav"), 0.1 * tone(10.0, 50, 7))
    with open(os.path.join(d, "validation_list.txt"), "w") as fh:
        fh.write("\n".join(val) + "\n")
    with open(os.path.join(d, "testing_list.txt"), "w") as fh:
        fh.write("\n".join(test) + "\n")


def readme_block():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Reproducing the paper", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="restrict the README's model loop to these checkpoint names")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = p.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="bat_dry_run_")
    os.makedirs(work, exist_ok=True)
    for f in ("probe_cgp.py", "finetune.py", "bat"):
        if not os.path.exists(os.path.join(work, f)):
            os.symlink(os.path.join(ROOT, f), os.path.join(work, f))
    make_checkpoints(os.path.join(work, "ckpt"))
    make_audioset(os.path.join(work, "data", "AudioSet"))
    make_esc50(os.path.join(work, "data", "ESC-50-master"))
    make_scv2(os.path.join(work, "data", "speech_commands_v0.02"))
    block = readme_block()
    if args.models:
        block = re.sub(r"for M in [^;]*;", f"for M in {' '.join(args.models)};", block)
    script = "set -e\n" + SHIM + block.replace("python ", "timed python ")
    script = "timed() { local t0=$SECONDS; \"$@\"; echo \"DRYRUN $((SECONDS - t0))s: ${*:2}\" >&2; }\n" + script
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    res = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("DRYRUN")]
    for ln in lines:
        cmd = ln.split(": ", 1)[1]
        out = re.search(r"--out (\S+)", cmd)
        summary = ""
        if out and os.path.isfile(os.path.join(work, out.group(1), "metrics.json")):
            m = json.load(open(os.path.join(work, out.group(1), "metrics.json")))
            summary = ", ".join(f"{k} {100 * m[k]:.1f}" for k in ("accuracy", "mAP") if isinstance(m.get(k), float))
        print(f"{ln.split(':')[0][7:]:>5} {cmd[:110]}  [{summary}]")
    print(f"{len(lines)} commands in {time.time() - t0:.0f} s, exit {res.returncode} (work folder {work})")
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(res.returncode)


if __name__ == "__main__":
    main()
