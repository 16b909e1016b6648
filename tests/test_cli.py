"""Every command a user types first, typed as a user types it: `X --help` prints a usage message and exits 0;
a bare call (no flags) of a command that needs some prints what is missing and exits 2. Never a traceback."""

import dataclasses
import functools
import glob
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bat.cli import FlagError, MAX_SEED

ROOT = Path(__file__).resolve().parents[1]
# Every benchmark that runs as a script (gpu_checks_*.py are modules that gpu_check.py imports).
BENCHMARKS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "benchmarks" / "*.py"))
                    if '__name__ == "__main__"' in Path(p).read_text())
SCRIPTS = ["pretrain.py", "probe_cgp.py", "finetune.py", "export.py", "examples/serve.py", *BENCHMARKS]
MODULES = ["bat.tag", "bat.shards", "bat.demo", "bat.audioset"]
# pretrain.py with no flags is the demo run (it needs no data), so it is left out of the bare calls.
NEED_ARGUMENTS = ["probe_cgp.py", "finetune.py", "export.py", "examples/serve.py", *(f"-m {m}" for m in MODULES)]


@functools.cache  # a command line run by two tests (export.py --help) runs once per test process
def run(command, *args):
    argv = command.split() if command.startswith("-m ") else [command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)


@pytest.mark.parametrize("command", SCRIPTS + [f"-m {m}" for m in MODULES])
def test_help_prints_usage_and_exits_0(command):
    r = run(command, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout and "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("command", NEED_ARGUMENTS)
def test_a_bare_call_says_what_is_missing(command):
    r = run(command)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "required" in out.lower() or "missing" in out.lower()


def test_a_missing_file_is_named_with_its_reason(tmp_path):
    """python -m bat.audioset on a folder without REF's layout: "PATH: reason", as the scripts say it."""
    r = run("-m bat.audioset", str(tmp_path / "AudioSet"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == \
        f"error: {tmp_path / 'AudioSet' / 'ontology.json'}: No such file or directory", r.stderr


PARSE_ERRORS = [  # (script, flags, the one line): tyro's framed box of several lines, as the message alone
    ("probe_cgp.py", ["--encoder", "x", "--train", "y", "--bogus"], "error: Unrecognized options: --bogus (see "
                                                                     "probe_cgp.py --help)"),
    ("pretrain.py", ["--steps", "abc"], "error: Error parsing --steps: invalid literal for int() with base 10: "
                                        "'abc' (see pretrain.py --help)"),
    ("finetune.py", ["--train", "y"], "error: missing --encoder (see finetune.py --help)"),
    ("probe_cgp.py", ["--encoder", "x", "--train", "y", "--probe", "foo"], "error: invalid choice 'foo' for "
     "argument '--probe'. Expected one of ('cgp', 'lcgp', 'lp', 'protobin', 'h2t', 'vqt'). (see probe_cgp.py --help)"),
    ("export.py", [], "error: missing --checkpoint (see export.py --help)"),
    ("probe_cgp.py", ["--encodr", "x", "--train", "y"],  # a mistyped required flag: both sections of the box
     "error: missing --encoder; Unrecognized options: --encodr x (see probe_cgp.py --help)"),
]


@pytest.mark.parametrize("script,flags,line", PARSE_ERRORS)
def test_a_flag_tyro_cannot_parse_ends_in_one_error_line(script, flags, line):
    r = run(script, *flags)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.splitlines() == [line], r.stderr[-2000:]


def test_under_torchrun_only_the_first_process_prints_help_or_a_parse_error():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1"}
    for flags in (["--help"], ["--bogus"]):
        r = subprocess.run([sys.executable, "probe_cgp.py", *flags], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (0 if flags == ["--help"] else 2, "", "")


@pytest.mark.parametrize("script", ["probe_cgp.py", "finetune.py"])
def test_task_help_shows_that_tasks_recipe(script):
    r = run(script, "--task", "esc50", "--help")
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr
    assert "usage:" in r.stdout


def test_export_help_has_a_summary_and_describes_every_flag():
    text = " ".join(run("export.py", "--help").stdout.split())
    assert "Export a probe, fine-tuned model or bare encoder" in text
    assert "ONNX opset" in text


@pytest.mark.parametrize("script", ["pretrain.py", "probe_cgp.py", "finetune.py", "export.py"])
def test_help_into_a_closed_pipe_exits_quietly(script):
    # `X --help | head -1`, made deterministic: the reading end is closed before the script writes a byte.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, script, "--help"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r.stderr[-2000:]


SHARED_FLAGS = [  # (flags, the one-line error): bat.cli.check_flags refuses them in every script that has them
    (["--seed", "-1"], "--seed must lie in [0, 4294967295], got -1"),  # was numpy's traceback (probe, finetune)
    (["--seed", str(2**64)], f"--seed must lie in [0, 4294967295], got {2**64}"),  # was torch's overflow
    (["--adam-beta1", "1"], "--adam-beta1 must lie in [0, 1), got 1.0"),  # was AdamW's ValueError
    (["--adam-beta2", "1"], "--adam-beta2 must lie in [0, 1), got 1.0"),
    (["--min-lr", "1", "--lr", "5e-5"], "--min-lr must not exceed --lr, got --min-lr 1.0 and --lr 5e-05"),
    (["--drop-path", "1"], "--drop-path must lie in [0, 1), got 1.0"),  # finetune: a NaN loss
    (["--head-dropout", "1"], "--head-dropout must lie in [0, 1), got 1.0"),  # finetune: a head that learns nothing
    (["--dropout", "1"], "--dropout must lie in [0, 1), got 1.0"),  # probe: a head that learns nothing
    (["--held-out", "1"], "--held-out must lie in [0, 1), got 1.0"),  # probe: nothing left to train on
    (["--test-fraction", "0"], "--test-fraction must lie in (0, 1), got 0.0"),  # was: one clip a class held out
    (["--lr", "1e-2", "--lr-grid", "1e-3", "1e-2", "--min-lr", "2e-3"],
     "--min-lr must not exceed the --lr-grid values, got --min-lr 0.002 and 0.001"),
]
TRAINING_SCRIPTS = {"pretrain": [], "probe_cgp": ["--encoder", "random:tiny", "--train", "data"],
                    "finetune": ["--encoder", "random:tiny", "--train", "data"]}


def has_flags(script, flags):
    fields = {f.name for f in dataclasses.fields(importlib.import_module(script).Config)}
    return all(f[2:].replace("-", "_") in fields for f in flags if f.startswith("--"))


def parsed(script, flags):
    module = importlib.import_module(script)
    return module, module.parse_config(TRAINING_SCRIPTS[script] + flags)


@pytest.mark.parametrize("script, flags, error", [(script, flags, error) for script in TRAINING_SCRIPTS
                                                  for flags, error in SHARED_FLAGS if has_flags(script, flags)])
def test_training_scripts_refuse_shared_settings_out_of_range_alike(script, flags, error):
    module, cfg = parsed(script, flags)
    with pytest.raises(FlagError, match=f"^{re.escape(error)}$"):
        module.check(cfg)


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_scripts_take_the_edges_of_the_shared_ranges(script):
    edges = [["--seed", "0"], ["--seed", str(MAX_SEED)], ["--adam-beta1", "0"], ["--adam-beta2", "0.999"],
             ["--min-lr", "5e-5", "--lr", "5e-5"], ["--ema-start", "1", "--ema-end", "1"],  # a frozen teacher
             ["--drop-path", "0.99"], ["--head-dropout", "0"]]
    for flags in edges:
        if has_flags(script, flags):
            module, cfg = parsed(script, flags)
            module.check(cfg)


def test_the_error_line_needs_no_tqdm(monkeypatch, capsys):
    """The torch-free install (bat.tag, bat.audioset, bat.shards) has no tqdm: error_exit still prints one line."""
    from bat.cli import error_exit

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    with pytest.raises(SystemExit) as e:
        error_exit(FileNotFoundError(2, "No such file or directory", "/data/ontology.json"))
    assert e.value.code == 2 and capsys.readouterr().err == "error: /data/ontology.json: No such file or directory\n"
