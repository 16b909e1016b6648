"""Every command a user types first, typed as a user types it: `X --help` prints a usage message and exits 0;
a bare call (no flags) of a command that needs some prints what is missing and exits 2. Never a traceback."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every benchmark that runs as a script (gpu_checks_*.py are modules that gpu_check.py imports).
BENCHMARKS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "benchmarks" / "*.py"))
                    if '__name__ == "__main__"' in Path(p).read_text())
SCRIPTS = ["pretrain.py", "probe_cgp.py", "finetune.py", "export.py", "examples/serve.py", *BENCHMARKS]
MODULES = ["bat.tag", "bat.shards", "bat.demo", "bat.audioset"]
# pretrain.py with no flags is the demo run (it needs no data), so it is left out of the bare calls.
NEED_ARGUMENTS = ["probe_cgp.py", "finetune.py", "export.py", "examples/serve.py", *(f"-m {m}" for m in MODULES)]


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
