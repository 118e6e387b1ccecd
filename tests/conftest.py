import os
from pathlib import Path

import pytest
import torch

# Triton kernels are tested on the CPU through Triton's interpreter when there is no GPU; the variable
# must be set before the kernel module is imported (it is imported lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# keep runs reproducible and the 2-core machine responsive
torch.manual_seed(0)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA}")
    return SHARED_DATA
