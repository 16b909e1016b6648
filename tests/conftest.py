import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONPATH", str(ROOT))  # for scripts the tests run in subprocesses
# Scripts run as subprocesses get one OpenMP thread: two would spin-wait against pytest and DataLoader workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# pytest-xdist (pyproject's addopts: -n 2) runs two test processes; each gets its share of the cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
