"""AudioSet manifests for probe_cgp.py / finetune.py from the layout the reference implementation downloads.

    python -m bat.audioset data/AudioSet data/audioset    # -> as20k_train.csv, as2m_train.csv, as_eval.csv

The BAT reference code (github.com/houtan-ghaffari/BAT_ICML2026, download_audioset.py) stores
`{balanced_train,unbalanced_train,eval}_segments/Y<YouTube id>.wav` next to Google's segment lists
(`*_segments.csv`) and `ontology.json`. Each manifest row is `path,labels` with the class *names* of the
clip separated by ';' (our multi-label CSV format), for the clips whose audio is present. As in REF, the
two files REF found corrupt are left out and only classes that occur in the evaluation list are kept.
"""
import argparse
import csv
import json
import os
import sys

SPLITS = {"balanced_train_segments": "as20k_train.csv", "unbalanced_train_segments": "as2m_train.csv",
          "eval_segments": "as_eval.csv"}
REF_CORRUPT = {"eval_segments/YmW3S0u8bj58.wav", "unbalanced_train_segments/YwM5Qf5xXT8w.wav"}


def read_segments(root, split, names):
    """[(wav path, [class names])] of the clips of `split` whose audio file exists."""
    folder = os.path.join(root, split)
    present = {f[1:-4] for f in os.listdir(folder) if f.startswith("Y") and f.endswith(".wav")} \
        if os.path.isdir(folder) else set()
    rows = []
    path = os.path.join(root, f"{split}.csv")
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.startswith("#") or not line.strip():
                continue
            fields = [x.strip() for x in line.split(",", 3)]
            if len(fields) != 4:  # YTID, start_seconds, end_seconds, "labels"
                raise ValueError(f"{path}:{number}: not a segments line (YTID, start, end, labels)")
            ytid, _, _, labels = fields
            if ytid in present and f"{split}/Y{ytid}.wav" not in REF_CORRUPT:
                codes = labels.strip('"').replace(" ", "").split(",")
                rows.append((os.path.join(os.path.abspath(folder), f"Y{ytid}.wav"), [names.get(c, c) for c in codes]))
    return rows


def ours(path, root) -> bool:
    """Whether `path` is a manifest this module wrote for `root` (a re-run may replace it): the header
    path,labels, then rows whose wav lies under root."""
    try:
        with open(path, encoding="utf-8") as fh:
            header, first = fh.readline().strip(), fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return header == "path,labels" and (not first or first.startswith(os.path.abspath(root) + os.sep))


def write_manifests(root, out):
    """Write one manifest per split found under root; returns {file name: clips}."""
    with open(os.path.join(root, "ontology.json"), encoding="utf-8") as fh:
        names = {o["id"]: o["name"] for o in json.load(fh)}
    found = {s: read_segments(root, s, names) for s in SPLITS if os.path.isfile(os.path.join(root, f"{s}.csv"))}
    if "eval_segments" not in found:
        raise SystemExit(f"error: {root}/eval_segments.csv not found (REF's AudioSet layout)")
    keep = {c for _, labels in found["eval_segments"] for c in labels}  # REF: the classes of the eval list
    for split in found:
        path = os.path.join(out, SPLITS[split])
        if os.path.exists(path) and not ours(path, root):
            raise FileExistsError(f"{path} exists and is not a manifest of {root}: choose another OUT "
                                  "(this never overwrites files it did not write)")
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split, rows in found.items():
        path = os.path.join(out, SPLITS[split])
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "labels"])
            for wav, labels in rows:
                w.writerow([wav, ";".join(sorted({c for c in labels if c in keep}))])
        counts[SPLITS[split]] = len(rows)
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="REF's AudioSet folder (segment CSVs, ontology.json, *_segments/ with wavs)")
    p.add_argument("out", help="folder for as20k_train.csv, as2m_train.csv, as_eval.csv")
    a = p.parse_args()
    try:
        for name, n in write_manifests(a.root, a.out).items():
            print(f"{os.path.join(a.out, name)}: {n} clips")
    except (OSError, ValueError) as e:
        from bat.cli import error_exit

        error_exit(e)  # an OSError as "path: reason"
    except (KeyError, TypeError, AttributeError):  # ontology.json is JSON, but not a list of {id, name}
        print(f"error: {os.path.join(a.root, 'ontology.json')}: not AudioSet's ontology (a list of objects with "
              "id and name)", file=sys.stderr)
        sys.exit(2)
