import os
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
