import fcntl
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(ROOT))
from bat.cpu import usable_cpus  # noqa: E402
os.environ.setdefault("PYTHONPATH", str(ROOT))  # for scripts the tests run in subprocesses
# Scripts run as subprocesses get one OpenMP thread: two would spin-wait against pytest and DataLoader workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# pytest-xdist (pyproject's addopts: -n 2) runs two test processes; each gets its share of the cores
# (of the CPUs this process may use: a CI container's CPU quota, not the node's core count).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, usable_cpus() // WORKERS)))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """shared(name, build) -> (folder, result): build(folder) runs once per test session, in whichever test
    process asks first; the other pytest-xdist worker waits for it and gets the same folder and result (pickled).
    For the exports and runs that take tens of seconds and that tests only read: without it each worker
    that runs one of their tests repeats them. Tests must not write into the folder."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"  # the workers' common parent
    root.mkdir(exist_ok=True)

    def get(name, build):
        folder, done = root / name, root / f"{name}.pickle"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also when build raises
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # what a build that failed in the other worker left
                folder.mkdir()
                done.write_bytes(pickle.dumps(build(folder)))
        return folder, pickle.loads(done.read_bytes())

    return get


def write_demo_sets(root):
    from bat import demo

    demo.write_demo_dataset(root / "train", clips_per_class=5, seconds=1.0, seed=0)
    demo.write_demo_dataset(root / "test", clips_per_class=2, seconds=1.0, seed=1)


@pytest.fixture(scope="session")
def demo_sets(shared):
    """The script tests' small labelled set: train/ (5 one-second demo clips per class) and test/ (2 per class),
    written once per session. Read only: a test that changes files copies them first."""
    return shared("demo_sets", write_demo_sets)[0]


@pytest.fixture(scope="session")
def tagger_export(shared):
    """test_tag.py's hand-set tagger of three sound classes (tone, noise, clicks), exported by export.py once per
    session for test_tag.py, test_serve.py and test_packaging.py: (folder with model.safetensors and model.onnx,
    the export check's largest tolerance of scores)."""
    from test_tag import export_tagger

    return shared("tagger", export_tagger)


@pytest.fixture(scope="session")
def frame_wise_export(shared):
    """test_export.py's frame-wise (SED) probe, exported and checked by export.py once per session for
    test_export.py and test_tag.py: (folder with sed.safetensors and sed.onnx, export.py's result)."""
    from test_export import export_frame_wise

    return shared("frame_wise", export_frame_wise)
