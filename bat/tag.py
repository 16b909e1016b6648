"""Tag audio files with an exported model (export.py): the command line of bat.tagger, no PyTorch.

    python -m bat.tag tagger.onnx dog.wav street.flac --top-k 3
    python -m bat.tag tagger.onnx hour_long.flac --timeline --json
    python -m bat.tag sed.onnx recording.wav --events
    python -m bat.tag --info                       # this CPU's instruction set, usable CPUs, onnxruntime's providers

Each file is read (any format and rate soundfile reads), resampled to the model's rate and mixed to mono,
and scored as the model's windows (bat.tagger: what a score means); its top-k labels are printed as soon
as it is scored. `--timeline` shows every window, `--events` a frame-wise (SED) model's events. Long
files are read and scored in blocks, so memory does not grow with the file's length; frame-wise models
read a recording whole. An unreadable file costs only its own result (a one-line error on stderr, exit
status 1). The Python API (Tagger, read_blocks) is importable from here as from bat.tagger.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from bat.audio import AudioError, error_line
from bat.tagger import Tagger, as_batch, create_session, num_windows, read_blocks  # noqa: F401  (the API, here too)


# ------------------------------------------------------------------------------------------ CLI

def parse_args(argv=None):
    prog = "bat-tag" if os.path.basename(sys.argv[0]) == "bat-tag" else "python -m bat.tag"  # the console script
    p = argparse.ArgumentParser(prog=prog, description=(
        "Tag audio files with a model exported by export.py (onnxruntime, no PyTorch). Prints each file's "
        "top-k labels as soon as it is scored; long files are scored in blocks of the model's windows with "
        "bounded memory. Unreadable files get a one-line error on stderr, the others are still tagged, and "
        "the exit status is 1."))
    p.add_argument("model", help="MODEL.onnx written by export.py")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (any format and rate soundfile reads)")
    p.add_argument("--top-k", type=int, default=5, help="labels to print per file or window (default 5)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per file: file, duration, labels (+ windows, events)")
    p.add_argument("--timeline", action="store_true",
                   help="also every window's top labels with its start and end time")
    p.add_argument("--events", action="store_true",
                   help="sound events (label, onset, offset) of a frame-wise (SED) model: median filter of "
                        "3 patches, threshold 0.3, as the BAT reference implementation")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the CUDA execution provider where it loads, else the CPU with a notice")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads (default 0: automatic, one per CPU this process may use where "
                        "a container's CPU quota or an affinity mask limits them, else onnxruntime's own choice)")
    p.add_argument("--batch-size", type=int, default=8, help="short files scored together per run (default 8)")
    p.add_argument("--info", action="store_true",
                   help="print this CPU's instruction set (AVX2, AVX-512, VNNI, BF16, AMX), onnxruntime's version "
                        "and providers, the CPUs this process may use (a container's CPU quota counts) and MODEL's "
                        "precision when given, then exit; no FILE needed")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.top_k < 1:
        p.error("--top-k must be at least 1")
    cores = os.cpu_count() or 1  # the machine's, not the usable CPUs: a bound on typos, not a default
    if not 0 <= args.threads <= 4 * cores:  # onnxruntime starts every thread asked for: 100000 never finishes
        p.error(f"--threads must be between 0 (automatic) and {4 * cores} (this machine has {cores} cores)")
    return args


def format_result(path: str, result: dict, tagger: Tagger, args) -> list[str]:
    """The lines printed for one file: one JSON object, or a summary line (+ windows, events)."""
    top = tagger.top_k(result["scores"], args.top_k)
    windows = [(a, b, tagger.top_k(s, args.top_k)) for a, b, s in result["windows"]] if args.timeline else []
    events = result.get("events", []) if args.events else []
    if args.json:
        row = {"file": path, "duration": round(result["duration"], 3),
               "labels": [{"label": l, "score": round(s, 6)} for l, s in top]}
        if args.timeline:
            row["windows"] = [{"start": round(a, 3), "end": round(b, 3),
                               "labels": [{"label": l, "score": round(s, 6)} for l, s in t]} for a, b, t in windows]
        if args.events:
            row["events"] = [{"label": l, "onset": on, "offset": off} for l, on, off in events]
        return [json.dumps(row)]
    text = lambda t: ", ".join(f"{l} {s:.3f}" for l, s in t)  # noqa: E731
    lines = [f"{path}: {text(top)}"]
    lines += [f"{path} [{a:.2f}-{b:.2f} s]: {text(t)}" for a, b, t in windows]
    lines += [f"{path} event {l}: {on:.2f}-{off:.2f} s" for l, on, off in events]
    return lines


def tag_files(tagger: Tagger, files: Sequence[str], args, out=sys.stdout, err=sys.stderr) -> int:
    """Tag files in input order, printing each result as soon as it is scored. Short files are batched
    (up to --batch-size, at most Tagger.block_samples() of padded audio per run); long ones are streamed block by
    block. Returns the number of failures: a file that cannot be read or scored (even out of memory)
    costs only its own result, and a failed batch is retried file by file."""
    block = tagger.block_samples()
    failed, pending = 0, []  # pending: (path, clip) of short files waiting for a batch

    def report(path, e):
        nonlocal failed
        if isinstance(e, BrokenPipeError):  # the reader went away (`| head`): not this file's fault; stop
            raise e
        failed += 1
        msg = str(e) if isinstance(e, AudioError) else \
            f"{path}: cannot score ({error_line(e)})"
        print(f"error: {msg}", file=err, flush=True)

    def emit(path, result):
        for line in format_result(path, result, tagger, args):
            print(line, file=out, flush=True)

    def flush():
        if not pending:
            return
        try:
            results = tagger.tag_many([c for _, c in pending])
        except Exception:  # noqa: BLE001 - e.g. out of memory: retry one by one, so only a bad file fails
            results = None
        for i, (path, clip) in enumerate(pending):
            try:
                emit(path, results[i] if results else tagger.tag(clip))
            except Exception as e:  # noqa: BLE001
                report(path, e)
        pending.clear()

    for path in files:
        try:
            pieces, seconds = read_blocks(path, tagger.sample_rate, block)
            if seconds * tagger.sample_rate <= block:  # short: read whole, batched with its neighbours
                clip = np.concatenate(list(pieces))  # short after resampling, not always in the file's own frames
                if pending and (len(pending) >= args.batch_size or
                                (len(pending) + 1) * max(len(clip), *(len(c) for _, c in pending)) > block):
                    flush()
                pending.append((path, clip))
                continue
            flush()  # keep the input order
            emit(path, tagger.tag_stream(pieces))
        except Exception as e:  # noqa: BLE001 - one line per bad file; the other files go on
            report(path, e)
    flush()
    return failed


def info_lines(model: str | None = None) -> list[str]:
    """`--info`: the CPU's ISA (bat.cpu), onnxruntime's version and providers, the CPUs this process may use,
    what export.py's int8 and PyTorch's --precision auto pick on this CPU, and a model's precision."""
    import onnxruntime as ort

    from bat.cpu import cpu_isa, cpus_string, isa_string
    from bat.onnx_graph import INT8_SCHEMES, int8_scheme

    isa = cpu_isa()
    scheme, reason = int8_scheme(isa)
    lines = [f"cpu: {isa_string(isa)}",
             f"onnxruntime {ort.__version__}: providers built in {', '.join(ort.get_available_providers())}",
             cpus_string(),  # after the lines scripts may read by position
             f"int8 here: export.py --quantize int8 writes {INT8_SCHEMES[scheme]} ({reason})",
             "bf16 here: " + ("native: --precision auto extracts PyTorch features in bf16" if isa.native_bf16 else
                              "emulated (slower than float32): --precision auto stays float32")]
    if model is not None:
        meta = Tagger(model).metadata
        scheme = f" ({meta['int8_scheme']}, exported on {meta.get('int8_isa', '?')})" if "int8_scheme" in meta else ""
        lines.append(f"model: {model}: {meta.get('precision', 'fp32')}{scheme}")
    return lines


def main(argv=None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's status for it
        print("stopped (Ctrl-C)", file=sys.stderr)
        return 130


def _main(argv: list) -> int:
    if "--info" in argv:  # before parse_args: FILE (and MODEL) are optional here
        valued = {"--top-k", "--device", "--threads", "--batch-size"}  # their values are not MODEL
        rest = [a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in valued)]
        try:
            print("\n".join(info_lines(rest[0] if rest else None)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    args = parse_args(argv)
    try:
        tagger = Tagger(args.model, args.device, args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tagger.notice:
        print(tagger.notice, file=sys.stderr)
    if "scores" not in tagger.outputs:
        print(f"error: {args.model}: encoder-only export (no classifier head): nothing to tag", file=sys.stderr)
        return 2
    if args.events and not tagger.frame_wise:
        print(f"error: {args.model}: --events needs a frame-wise (sound event detection) model; this one "
              "scores whole windows (use --timeline)", file=sys.stderr)
        return 2
    try:
        failed = tag_files(tagger, args.files, args)
    except BrokenPipeError:  # `bat.tag ... | head`: the rest is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, as a shell tool cut off by `head`
    if failed and len(args.files) > 1:  # one file: its error line says it all
        print(f"{failed} of {len(args.files)} file(s) could not be tagged", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
