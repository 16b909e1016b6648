"""The scripts' command lines and terminal: flags in, one error line out.

tyro reports a bad flag in a framed box of several lines; the scripts promise one `error: ...` line
for bad input, so `parse_flags` keeps the box's message and drops the frame:

    error: Unrecognized options: --bogus (see probe_cgp.py --help)

Under torchrun every process parses the same command line; only the first prints help or errors.
`check_flags` refuses out-of-range values the same way (`FlagError`), and `error_exit` ends a script on
any user-facing error with that one line, after closing the progress bars that would redraw below it.
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


class FlagError(ValueError):
    """A command-line value out of its range; the message is one line naming the flag."""


# The largest --seed: the scripts derive generator seeds from it (bat/sampler.py: seed * 1_000_003 + epoch) that
# torch refuses from 2**64 on; 2**32 - 1 is also numpy's legacy seed range (seed_everything).
MAX_SEED = 2**32 - 1


def check_flags(cfg, at_least=None, positive=(), fractions=()):
    """Refuse out-of-range values at parse time, one line each (None means "use the default" and passes):
    at_least {name: minimum} for counts, positive: names that must be > 0, fractions: names in [0, 1].
    Fields the training scripts share are checked whenever the config has them, whatever the lists say:
    seed in [0, MAX_SEED], adam_beta1/2 in [0, 1) (AdamW refuses 1), min_lr not above lr."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    seed = getattr(cfg, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise FlagError(f"--seed must lie in [0, {MAX_SEED}], got {seed}")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(cfg, name, None)
        if v is not None and not 0 <= v < 1:
            raise FlagError(f"{flag(name)} must lie in [0, 1), got {v}")
    for name, low in (at_least or {}).items():
        v = getattr(cfg, name)
        if v is not None and v < low:
            raise FlagError(f"{flag(name)} must be >= {low}, got {v}")
    for name in positive:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise FlagError(f"{flag(name)} must be > 0, got {v}")
    for name in fractions:
        v = getattr(cfg, name)
        if v is not None and not 0 <= v <= 1:
            raise FlagError(f"{flag(name)} must lie in [0, 1], got {v}")
    lr, min_lr = getattr(cfg, "lr", None), getattr(cfg, "min_lr", None)
    if lr is not None and min_lr is not None and min_lr > lr:  # after --lr's own check: a bad --lr is named as such
        raise FlagError(f"--min-lr must not exceed --lr, got --min-lr {min_lr} and --lr {lr}")


def error_exit(error, code: int = 2):
    """End a script on a user-facing error: close the progress bars, print `error: ...` as the last
    line on stderr (an OSError as "path: reason") and exit with `code`."""
    close_progress_bars()
    if isinstance(error, BrokenPipeError):  # the reader went away (`--help | head`): nothing left to tell it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        sys.exit(141)  # 128 + SIGPIPE, what a shell tool cut off by `head` returns
    if isinstance(error, OSError) and error.filename:
        error = f"{error.filename}: {error.strerror or error}"
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


def close_progress_bars() -> None:
    """Close every open tqdm bar, so that an error printed next gets a line of its own (a bar still open
    when the script ends would redraw itself below the error). Without tqdm (the torch-free install) there is none."""
    try:
        from tqdm import tqdm
    except ImportError:
        return

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class TqdmStream:
    """stderr through tqdm.write, so a warning printed while a progress bar runs gets its own line."""

    def write(self, text):
        if text.strip():
            from tqdm import tqdm

            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self):
        sys.stderr.flush()
