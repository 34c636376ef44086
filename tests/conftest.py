import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with spinning, two processes with two threads each on
# two cores slow each other down tens of times (seen here at load ~10), which subprocess tests create.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]
os.environ.setdefault("HYDRA_FULL_ERROR", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402

import tread_bench.kinds  # noqa: E402,F401  (the built-in suite kinds, as run_suite.py registers them)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after it): the scan tests' tensors are small, and on a
    shared 2-core machine intra-op threads spin and cost ~30x CPU time. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: start this test from a
    fresh one and leave a fresh one to the tests after it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
