import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tunelens sets it, before torch starts OpenMP

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """One quick end-to-end default run shared by the pipeline, report and browser tests."""
    from tunelens.cli import main

    out = tmp_path_factory.mktemp("quick_run")
    assert main(["run", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small-tensor tests: a second thread gains nothing there, and on a
    shared machine a descheduled OpenMP thread makes every operator wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
