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
# under pytest-xdist (`-n N`) the workers share the cores: each, and every process it starts, gets its share
# of the threads (N processes of all-cores threads would make OpenMP's waiting threads spin against each other)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_image_folder(tmp_path_factory):
    """``make(per_class, noise=45.0) -> root``: a two-class image folder (``dark/``, ``bright/``) of 16x16 RGB
    PNGs, ``per_class`` each, grey levels 70 and 180 plus Gaussian noise of that standard deviation (seeded):
    the smallest data set the trainer, the progress lines and ``bench train`` learn from."""
    import numpy as np
    from PIL import Image

    def make(per_class: int, noise: float = 45.0) -> Path:
        root = tmp_path_factory.mktemp("imgs")
        rng = np.random.default_rng(0)
        for name, base in (("dark", 70), ("bright", 180)):
            (root / name).mkdir()
            for i in range(per_class):
                pixels = np.clip(rng.normal(base, noise, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
        return root

    return make


def pytest_collection_modifyitems(config, items):
    """The parts of timm's suite (the longest slow tests) first, so that pytest-xdist starts them before the
    short ones instead of leaving one worker with them at the end; the order is the same in every worker."""
    first = [i for i in items if i.nodeid.startswith("tests/test_timm_suite.py::test_timm_model_suite_passes[")]
    if first:
        items[:] = first + [i for i in items if i not in first]
