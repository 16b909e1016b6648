"""The scripts' command lines: tyro, with a parse error in one line.

tyro reports a bad flag in a framed box of several lines; the scripts promise one `error: ...` line
for bad input, so `parse_flags` keeps the box's message and drops the frame:

    error: Unrecognized options: --bogus (see probe_cgp.py --help)

Under torchrun every process parses the same command line; only the first prints help or errors.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

FRAME = "╭╰│─"


def parse_flags(config_cls, default=None, args=None):
    """tyro.cli(config_cls, default=default, args=args); a parse error exits with code 2 after one line."""
    import tyro

    quiet = int(os.environ.get("RANK", "0")) > 0  # torchrun: rank 0 speaks for every process
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), (contextlib.redirect_stdout(out) if quiet else
                                               contextlib.nullcontext()):
            return tyro.cli(config_cls, default=default, args=args)
    except SystemExit as e:
        if e.code in (0, None) or quiet:  # --help (printed already), or another process's copy of the error
            raise
        print(f"error: {one_line(err.getvalue())}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(box: str) -> str:
    """tyro's error box -> its messages in one line (each section's text above its rule: "missing --encoder;
    Unrecognized options: --encodr x") and the script's --help pointer the box ends with."""
    lines = [ln.strip().strip("│").strip() for ln in box.splitlines()]
    title = next((ln.strip("╭╮─ ") for ln in lines if ln.startswith("╭")), "")
    sections, part = [], []
    for ln in lines:
        if ln.startswith(("╭", "╰")) or not ln:
            continue
        if set(ln) <= set(FRAME + " "):  # a rule: the end of a section
            sections.append(part)
            part = []
        else:
            part.append(ln)
    sections.append(part)
    messages = []
    for part in sections:
        if not part or part[0].startswith(("For full helptext", "Argument helptext")):
            continue
        if part[0].startswith("Missing from"):  # then each option with its help: name the options
            part = ["missing " + ", ".join(ln.split()[0] for ln in part if ln.startswith("--"))]
        messages.append(" ".join(part))
    message = "; ".join(messages) or title or box.strip() or "bad command line"
    at = next((k for k, ln in enumerate(lines) if "For full helptext" in ln), None)
    words = " ".join(lines[at:at + 2]).split() if at is not None else []
    script = next((w for w in words if w.endswith(".py")), None)
    return f"{message} (see {script} --help)" if script else message
