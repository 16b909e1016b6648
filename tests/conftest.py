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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
