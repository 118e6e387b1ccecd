"""The built wheel holds visionattn.kernels and visionattn.tasks and nothing under generic top-level names."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot list the project's files")
    for rel in tracked.stdout.split():
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("visionattn-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("visionattn/__init__.py", "visionattn/kernels/__init__.py", "visionattn/tasks/__init__.py",
                     "visionattn/tasks/bench.py", "visionattn/backbones/convit.py", "visionattn/cli.py",
                     "visionattn/detectors/dfir_detr.py", "visionattn/tasks/segment.py",
                     # the segment demo's model and sample volumes are package data
                     "visionattn/bundled/hippocampus_agunet/config.yaml",
                     "visionattn/bundled/hippocampus_agunet/model.safetensors",
                     "visionattn/bundled/samples/images/hippocampus_015.nii.gz",
                     "visionattn/bundled/samples/labels/hippocampus_015.nii.gz"):
        assert required in names, required
    top = {n.split("/")[0] for n in names}
    assert top <= {"visionattn", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "visionattn = visionattn.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_kernels_and_tasks(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r})\n"
        "import visionattn, visionattn.kernels, visionattn.tasks\n"
        f"assert visionattn.kernels.__file__.startswith({str(target)!r}), visionattn.kernels.__file__\n"
        f"assert visionattn.tasks.__file__.startswith({str(target)!r})\n"
        "print(visionattn.list_models('convit_tiny'))\n"
        "from visionattn.tasks.segment import BUNDLED, bundled_models\n"
        f"assert str(BUNDLED).startswith({str(target)!r}) and bundled_models() == ['hippocampus_agunet']\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "convit_tiny" in r.stdout


def test_editable_install_imports_kernels_and_tasks(tmp_path):
    code = "import visionattn.kernels, visionattn.tasks, visionattn.tasks.bench; print(visionattn.kernels.__file__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
