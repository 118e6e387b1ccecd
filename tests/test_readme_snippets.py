"""Every Python snippet and every command in README.md runs in a test, exactly as written (issue 13).

The README's fenced blocks are parsed here, so a new snippet or command is picked up by itself:

- every ```python block is executed as written, in a fresh namespace and a temporary working directory.
  A block that reads a local file a user would have (``convit_tiny.safetensors``) gets it from
  :data:`SNIPPET_SETUPS` first; a block the README presents as the continuation of an earlier one (it uses
  that block's names) runs after it in the same namespace (:data:`SNIPPET_CONTINUES`).
- every command line of the ```bash blocks (``\\`` continuations joined, comments dropped) must have an
  entry in :data:`COMMANDS`, which says how it is run: ``run`` to completion (exit code and the output
  it promises checked), ``start``-ed and stopped once it prints its first progress line (training
  recipes, torchrun, long benchmarks), ``setup`` (the venv + ``pip install`` lines: checked without
  reinstalling; ``.ci/run`` runs the test command itself) or ``skip`` (with the reason). A command missing
  from the table, or an entry no longer in the README, fails with its text.

Commands run with ``bash -c`` in a temporary folder laid out as the README assumes its repository root
is: ``configs`` links to the repository's recipes and ``../shared`` to the shared data sets, so recipes'
``../shared/data`` paths resolve and every output (``runs/``, ``visionattn-segment-demo/``, ...) lands in the
temporary folder. Subprocesses get ``TQDM_DISABLE=1`` and ``OMP_NUM_THREADS=1``.

The whole module is marked ``slow``: the README's test command runs the unit and integration tests, and
``.ci/run`` runs these with the other slow tests (``python -m pytest -q -m slow -n auto``).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED = REPO.parent / "shared"
BUNDLED = REPO / "visionattn" / "bundled"
BIN = Path(sys.executable).parent  # the venv's scripts: visionattn, torchrun

pytestmark = pytest.mark.slow  # see the module docstring


# ---------------------------------------------------------------------------------------------------
# parsing README.md


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the first line inside the fence
    text: str
    heading: str


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced code blocks of README.md, in order, with their language and the heading above them."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i, heading = [], 0, ""
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        m = re.match(r"^(`{3,})\s*([\w+-]*)", line)
        if m:
            fence, lang, start = m.group(1), m.group(2).lower(), i + 1
            j = start
            while j < len(lines) and not lines[j].startswith(fence):
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{i + 1}: fence ``` never closed")
            blocks.append(Block(lang, start + 1, "\n".join(lines[start:j]) + "\n", heading))
            i = j + 1
            continue
        i += 1
    return blocks


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` at the start of a word, outside quotes)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip()
    return line.rstrip()


def bash_commands(block: Block) -> list[tuple[int, str]]:
    """The command lines of a ```bash block: ``\\`` continuations joined, comments and blank lines dropped;
    each with its README line."""
    out, pending, first = [], "", 0
    for k, raw in enumerate(block.text.splitlines()):
        line = _strip_comment(raw)
        if not pending:
            first = block.line + k
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command:
            out.append((first, " ".join(command.split())))
    assert not pending, f"README.md:{first}: a command ends with a '\\' continuation"
    return out


BLOCKS = readme_blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.lang == "python"]
README_COMMANDS = [c for b in BLOCKS if b.lang == "bash" for c in bash_commands(b)]
# ```text blocks show output and the untagged block is the layout tree: neither is run
KNOWN_LANGS = {"python", "bash", "text", ""}


def test_the_readme_fences_are_parsed():
    assert {b.lang for b in BLOCKS} <= KNOWN_LANGS, (
        f"README.md has a fenced block in a language this test does not know: "
        f"{sorted({b.lang for b in BLOCKS} - KNOWN_LANGS)}; run it here (python / bash) or say why not")
    assert len(PYTHON_BLOCKS) >= 5 and len(README_COMMANDS) >= 20  # the parser found the README's blocks
    # the parser itself: continuations, comments, quotes
    demo = Block("bash", 1, 'a b \\\n    c  # note\n# only a comment\n\npip install -e ".[test]" && x # y\n', "")
    assert bash_commands(demo) == [(1, "a b c"), (5, 'pip install -e ".[test]" && x')]


# ---------------------------------------------------------------------------------------------------
# the Python snippets


def _convit_files(ws: Path) -> None:
    """``convit_tiny.safetensors`` and ``convit_tiny.pth``: the README says ConViT checkpoints from timm load
    unchanged, so the files a user would have are timm's own ``convit_tiny`` state dict (random weights)."""
    import timm
    import torch
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in timm.create_model("convit_tiny").state_dict().items()}
    save_file(sd, str(ws / "convit_tiny.safetensors"))
    torch.save(sd, ws / "convit_tiny.pth")


# a block that contains the key gets the setup run in its working folder first
SNIPPET_SETUPS: dict[str, Callable[[Path], None]] = {
    "convit_tiny.safetensors": _convit_files,
}
# a block that contains the key runs after the (earlier) block that contains the value, in its namespace:
# the README presents it as the next step of that example (it uses its `torch` and `visionattn`)
SNIPPET_CONTINUES: dict[str, str] = {
    "from monai.losses import DeepSupervisionLoss": "from visionattn.decoders import EMCADNet, MutationLoss",
}


# chains that take over a minute here (2 shared cores) run with the slow tests: the block containing the key
SLOW_SNIPPETS: dict[str, str] = {
    "from visionattn.decoders import EMCADNet, MutationLoss": "EMCAD-B2 at 224, 3-D U-Nets at 64^3, sliding windows "
                                                              "over 160x160x96: about 95 s",
    'create_model("dfir_detr"': "DFIR-DETR at 640, training and eval: about 35 s, with the slow detection commands",
}


def _find_block(fragment: str) -> Block:
    hits = [b for b in PYTHON_BLOCKS if fragment in b.text]
    assert len(hits) == 1, f"{len(hits)} python blocks of README.md contain {fragment!r}; the table needs one"
    return hits[0]


def snippet_chains() -> list[list[Block]]:
    """The python blocks grouped into runs: a block alone, or an example and its continuations in order."""
    parent: dict[int, Block] = {}
    for child, of in SNIPPET_CONTINUES.items():
        c, p = _find_block(child), _find_block(of)
        assert p.line < c.line, f"README.md:{c.line} continues README.md:{p.line}, which comes after it"
        parent[c.line] = p
    chains: dict[int, list[Block]] = {}
    for b in PYTHON_BLOCKS:
        root = b
        while root.line in parent:
            root = parent[root.line]
        chains.setdefault(root.line, []).append(b)
    return list(chains.values())


def _chain_id(chain: list[Block]) -> str:
    return "+".join(f"L{b.line}" for b in chain) + "-" + re.sub(r"\W+", "_", chain[0].heading).strip("_")


def _snippet_params():
    slow = {_find_block(fragment).line for fragment in SLOW_SNIPPETS}
    return [pytest.param(chain, marks=[pytest.mark.slow] if any(b.line in slow for b in chain) else [],
                         id=_chain_id(chain)) for chain in snippet_chains()]


@pytest.mark.parametrize("chain", _snippet_params())
def test_python_snippet_runs_as_written(chain, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for block in chain:
        setups = [fn for key, fn in SNIPPET_SETUPS.items() if key in block.text]
        for fn in setups:
            fn(tmp_path)
        torch.manual_seed(0)
        code = compile(block.text, f"README.md:{block.line}", "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the README's own snippet, as a reader runs it
        except NameError as e:
            raise AssertionError(
                f"README.md:{block.line} ({block.heading}) fails as written: {e}: add the import to the snippet or, if "
                "the README presents it as the next step of an earlier block, list it in SNIPPET_CONTINUES") from e
        except FileNotFoundError as e:
            if setups:
                raise
            raise AssertionError(
                f"README.md:{block.line} ({block.heading}) reads a local file a user would have ({e}): add a setup "
                "that makes it to SNIPPET_SETUPS") from e


# ---------------------------------------------------------------------------------------------------
# the commands: how each one runs


@dataclasses.dataclass(frozen=True)
class Cmd:
    mode: str  # run | start | setup | skip
    expect: tuple[str, ...] = ()  # regexes the output must match (run) / the progress line (start: the first one)
    files: tuple[str, ...] = ()  # paths (globs) that must exist in the working folder afterwards
    setup: tuple[str, ...] = ()  # names in SETUPS, run in the working folder first
    data: bool = False  # reads ../shared/data
    slow: bool = False
    timeout: int = 300
    rc: int = 0
    reason: str = ""  # skip: why; setup: what is checked instead
    check: Callable[[Path], None] | None = None  # more checks of the working folder afterwards


CASES = ("hippocampus_015", "hippocampus_020", "hippocampus_024")


def _check_predictions(path: Path) -> None:
    """``predict -o predictions.csv``: one row per image in my_images/, a CIFAR-10 class and a probability."""
    import csv

    rows = list(csv.DictReader(path.open()))
    assert sorted(r["path"] for r in rows) == [f"my_images/{c}_0000.jpg" for c in ("airplane", "cat", "ship")], rows
    assert all(r["class_name"] in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                   "truck") and 0 < float(r["probability"]) <= 1 for r in rows), rows
TRAIN_STEP = r"^step +1/\d+ epoch 1/\d+ loss \d"
EXPORT_CHECKED = (*(rf"(?m)^ +{shape} +max \|[\w-]+ - PyTorch\| = \S+ \(tolerance \S+\) +ok$"
                    for shape in ("2x1x40x56x40", "1x1x41x59x45", "1x1x61x87x65")), r"export: wrote .*verified at 3 sizes")

COMMANDS: dict[str, Cmd] = {
    # -- Set up
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && visionattn segment": Cmd(
        "setup", reason="the environment steps are checked in place (venv module, activate script, editable "
        "install of this checkout); `visionattn segment` is the next command of this table, run in full"),
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q -n auto': Cmd(
        "setup", reason=".ci/run runs exactly this line in a fresh clone (and the slow tests after it); here: "
        "it is the line .ci/run reads, the [test] extra exists, the environment steps are checked in place"),
    # -- Inspect and benchmark
    "visionattn list": Cmd("run", expect=(r"(?m)^convit_tiny +classification +va_convit_tiny$",
                                          r"(?m)^agunet_3d +segmentation +-$", r"(?m)^dfir_detr +detection +-$"),
                           timeout=60),
    "visionattn info convit_tiny": Cmd("run", expect=(r"params +5,710,512", r"FLOPs +[\d.]+ GFLOPs \([\d.]+ GMACs\)",
                                                      r"input size +3x224x224", r"paper +d'Ascoli")),
    "visionattn bench models convit_tiny --compare timm": Cmd(
        "run", expect=((r"(?m)^convit_tiny: batch 8 +input 224x224 .*ours_img_s [\d.]+ +timm_img_s [\d.]+ .*"
                        r"max_abs_diff \d\.\d+e-(0[5-9]|[1-9]\d)$"),), slow=True, timeout=600),
    "visionattn bench kernels": Cmd(
        "start", expect=(r"^\S+ \S+: fwd .*max\|diff\|",), slow=True, timeout=600,
        reason="the full benchmark takes many minutes; stopped after its first measured row"),
    "visionattn bench kernels --device cuda": Cmd(
        "gpu", expect=(r"^\S+ \S+: fwd .*max\|diff\|",), timeout=600,
        reason="with a GPU: started and stopped after its first measured row; without one it must say so "
        "in one line (exit 2)"),
    # -- Train
    "visionattn train configs/classification/cifar10_ninformer.yaml": Cmd(
        "start", expect=(TRAIN_STEP,), data=True, slow=True,
        reason="the recipe trains for minutes; stopped after its first step"),
    "visionattn train configs/classification/cifar10_convit.yaml train.epochs=5 train.amp=bf16": Cmd(
        "start", expect=(TRAIN_STEP.replace(r"epoch 1/\d+", "epoch 1/5"),), data=True, slow=True,
        reason="the recipe trains for minutes; stopped after its first step"),
    "visionattn train configs/classification/cifar10_convit.yaml --resume": Cmd(
        "start", expect=(r"^resuming from runs/cifar10_convit/last\.pt at step 1 ", r"^step +\d+/\d+ epoch \d+/30 loss"),
        setup=("cifar10_convit_run",), data=True, slow=True, timeout=600,
        reason="continues a short run made first (runs/cifar10_convit, 1 step); stopped at its first progress "
        "line (a resumed run prints one after its first step)"),
    "visionattn evaluate runs/cifar10_convit": Cmd(
        "run", expect=(r'"acc": \d',), setup=("cifar10_convit_run",), data=True),
    "visionattn evaluate configs/classification/cifar10_convit.yaml --checkpoint runs/cifar10_convit/best.safetensors":
        Cmd("run", expect=(r'"acc": \d',), setup=("cifar10_convit_run",), data=True, slow=True),
    "visionattn predict runs/cifar10_convit -i my_images/ -o predictions.csv": Cmd(
        "run", setup=("cifar10_convit_run", "my_images"), files=("predictions.csv",), data=True,
        check=lambda ws: _check_predictions(ws / "predictions.csv")),
    "torchrun --standalone --nproc_per_node 2 -m visionattn train configs/classification/cifar10_convit.yaml": Cmd(
        "start", expect=(r"x 2 process\(es\)", TRAIN_STEP), data=True, slow=True,
        reason="two processes training the recipe; stopped after the first step"),
    "torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 -m "
    "visionattn train configs/classification/cifar10_convit.yaml": Cmd(
        "skip", reason="needs two machines with 8 GPUs each and a rendezvous host HOST0; the command it runs "
        "(`-m visionattn train configs/classification/cifar10_convit.yaml`) is the one the 2-process torchrun "
        "line starts"),
    # -- Export
    "visionattn export hippocampus_agunet --format onnx -o hippocampus.onnx": Cmd(
        "run", expect=EXPORT_CHECKED, files=("hippocampus.onnx",)),
    "visionattn export runs/my_run --format torchscript -o model.pt": Cmd(
        "run", expect=EXPORT_CHECKED, files=("model.pt",), setup=("my_run",), slow=True),
    "visionattn export runs/my_run --format exported-program -o model.pt2": Cmd(
        "run", expect=EXPORT_CHECKED, files=("model.pt2",), setup=("my_run",), slow=True),
    # -- Segment NIfTI volumes
    "visionattn segment": Cmd(
        "run", expect=(r"segment: 3 case\(s\) with hippocampus_agunet",
                       *(rf"(?m)^{c} +ok .*ml.*Dice anterior 0\.\d+" for c in CASES),
                       r"mean Dice \(3 cases\): anterior 0\.8\d+, posterior 0\.8\d+",
                       r"segment: 3 of 3 cases written to visionattn-segment-demo"),
        files=("visionattn-segment-demo/summary.json",
               *(f"visionattn-segment-demo/{c}.{ext}" for c in CASES for ext in ("nii.gz", "png")))),
    "visionattn segment -i scans/ -o labels/ --model hippocampus_agunet --threads 4": Cmd(
        "run", expect=(r"3 of 3 cases written",), setup=("scans",),
        files=("labels/summary.json", *(f"labels/{c}.nii.gz" for c in CASES))),
    "visionattn segment -i case_0000.nii.gz -o out/ --model runs/hippocampus_agunet --tta --save-probabilities "
    "--overlay": Cmd("run", expect=(r"1 of 1 cases written",), setup=("case_0000", "hippocampus_agunet_run"),
                     files=("out/case.nii.gz", "out/case.npz", "out/case.png", "out/summary.json")),
    "visionattn segment -i scans/ -o labels/ --model runs/hippocampus_cv": Cmd(
        "run", expect=(r"3 case\(s\) with an ensemble of 5 \(runs/hippocampus_cv\)", r"3 of 3 cases written"),
        setup=("scans", "hippocampus_cv_trained"), files=("labels/summary.json", *(f"labels/{c}.nii.gz" for c in CASES))),
    "torchrun --standalone --nproc_per_node 4 -m visionattn segment -i scans/ -o labels/ --model runs/my_run": Cmd(
        "run", expect=(r"3 of 3 cases written",), setup=("scans", "my_run"), slow=True, timeout=600,
        files=("labels/summary.json", *(f"labels/{c}.nii.gz" for c in CASES))),
    # -- Detect
    "visionattn train configs/detection/neu_det_dfir_detr.yaml": Cmd(
        "start", expect=(TRAIN_STEP,), data=True, slow=True,
        reason="the recipe trains for 120 CPU-minutes; stopped after its first step"),
    "visionattn train configs/detection/neu_det_rtdetr_r18.yaml": Cmd(
        "start", expect=(TRAIN_STEP,), data=True, slow=True,
        reason="the recipe trains for 120 CPU-minutes; stopped after its first step"),
    "visionattn train configs/detection/neu_det_rtdetr_r18.yaml --resume": Cmd(
        "start", expect=(r"^resuming from runs/neu_det_rtdetr_r18/last\.pt at step 1 ",
                         r"^step +\d+/\d+ epoch \d+/1000 loss"),
        setup=("neu_det_rtdetr_r18_run",), data=True, slow=True, timeout=600,
        reason="continues a short run made first (runs/neu_det_rtdetr_r18, 1 step); stopped at its first "
        "progress line"),
    "visionattn curves runs/neu_det_rtdetr_r18 runs/neu_det_dfir_detr -o docs/neu_det_map_vs_time.png": Cmd(
        "run", expect=(r"(?m)^\| run \| minutes \| steps \| last map_50 \|",
                       r"(?m)^\| runs/neu_det_rtdetr_r18 \| [\d.]+ \| 1 \| [\d.]+ \|",
                       r"(?m)^\| runs/neu_det_dfir_detr \| [\d.]+ \| 1 \| [\d.]+ \|",
                       r"wrote docs/neu_det_map_vs_time\.png"),
        setup=("neu_det_rtdetr_r18_run", "neu_det_dfir_detr_run"), data=True, slow=True,
        files=("docs/neu_det_map_vs_time.png",)),
    "visionattn detect -i images/ -o out/ --model runs/neu_det_dfir_detr --score-threshold 0.3": Cmd(
        "run", expect=(r"3 of 3 images written", r"results\.json: 3 images"), setup=("neu_det_dfir_detr_run", "neu_images"),
        data=True, slow=True,
        files=("out/results.json", "out/images.json", "out/summary.json", "out/detections/*.json",
               "out/images/*.png")),
    # -- Export: MONAI bundle (the bundle commands run in the folder the export command wrote it to)
    "visionattn export hippocampus_agunet --format monai-bundle -o hippocampus_bundle": Cmd(
        "run", expect=(r"export: wrote hippocampus_bundle: configs/metadata\.json, inference\.json, train\.json",
                       r"the bundle's network matches the run's \(max abs difference 0\.0e\+00\)"),
        files=("hippocampus_bundle/configs/metadata.json", "hippocampus_bundle/configs/inference.json",
               "hippocampus_bundle/configs/train.json", "hippocampus_bundle/models/model.safetensors",
               "hippocampus_bundle/docs/README.md")),
    "python -m monai.bundle run --config_file hippocampus_bundle/configs/inference.json --bundle_root "
    "hippocampus_bundle --dataset_dir visionattn/bundled/samples/images --output_dir out": Cmd(
        "run", expect=(r"SupervisedEvaluator - INFO - Engine run finished",), setup=("hippocampus_bundle", "repo_tree"),
        files=tuple(f"out/{c}_seg.nii.gz" for c in CASES), slow=True),
    "python -m monai.bundle run --config_file hippocampus_bundle/configs/train.json --bundle_root hippocampus_bundle "
    "--dataset_dir ../shared/data/msd_hippocampus --epochs 100": Cmd(
        "start", expect=(r"Epoch: 1/100, Iter: 1/\d+ -- train_loss: \d",), setup=("hippocampus_bundle",), data=True,
        slow=True, reason="100 epochs of MONAI's SupervisedTrainer; stopped after its first iteration"),
    "visionattn crossval configs/segmentation/hippocampus_agunet_cv.yaml --folds 5 -o runs/hippocampus_cv": Cmd(
        "start", expect=(TRAIN_STEP,), data=True, slow=True),
    "visionattn crossval configs/segmentation/hippocampus_monai_unet_cv.yaml --folds 5 -o "
    "runs/hippocampus_cv_monai_unet": Cmd("start", expect=(TRAIN_STEP,), data=True, slow=True),
    "visionattn crossval --plot docs/hippocampus_dice_vs_time.png runs/hippocampus_cv runs/hippocampus_cv_monai_unet":
        Cmd("run", expect=(r"wrote docs/hippocampus_dice_vs_time\.png",), setup=("crossval_folders",),
            files=("docs/hippocampus_dice_vs_time.png",)),
    "visionattn crossval --plot docs/hippocampus_segresnet_dice_vs_time.png docs/results/hippocampus_cv_monai_segresnet":
        Cmd("run", expect=(r"wrote docs/hippocampus_segresnet_dice_vs_time\.png",), setup=("results_tree",),
            files=("docs/hippocampus_segresnet_dice_vs_time.png",)),
    "visionattn crossval configs/segmentation/drive_emcad.yaml train.threads=1 train.max_minutes=20 --folds 5 -o "
    "runs/drive_cv_emcad20": Cmd("start", expect=(TRAIN_STEP,), data=True, slow=True),
    "visionattn crossval configs/segmentation/drive_emcad.yaml train.threads=1 --folds 5 -o runs/drive_cv_emcad60":
        Cmd("start", expect=(TRAIN_STEP,), data=True, slow=True,
            reason="five folds of 60 CPU-minutes; stopped after the first fold's first step"),
    "visionattn crossval --plot docs/drive_cv_dice_vs_time.png docs/results/drive_cv_emcad20 docs/results/drive_cv_emcad60":
        Cmd("run", expect=(r"wrote docs/drive_cv_dice_vs_time\.png",), setup=("results_tree",),
            files=("docs/drive_cv_dice_vs_time.png",)),
    "visionattn curves docs/results/neu_det_rtdetr_r18 docs/results/neu_det_dfir_detr "
    "docs/results/neu_det_rtdetr_r18_2threads docs/results/neu_det_dfir_detr_2threads docs/results/neu_det_dfir_detr_1thread_3h "
    "-o docs/neu_det_map_vs_time.png": Cmd(
        "run", expect=(r"(?m)^\| docs/results/neu_det_rtdetr_r18 \| 120\.0 \| 2315 \| 0\.4628 \|",
                       r"(?m)^\| docs/results/neu_det_dfir_detr \| 120\.0 \| 2378 \| 0\.4527 \|",
                       r"(?m)^\| docs/results/neu_det_rtdetr_r18_2threads \| 90\.0 \| 2295 \| 0\.5156 \|",
                       r"(?m)^\| docs/results/neu_det_dfir_detr_2threads \| 90\.0 \| 2035 \| 0\.4953 \|",
                       r"(?m)^\| docs/results/neu_det_dfir_detr_1thread_3h \| 180\.0 \| 2898 \| 0\.5257 \|",
                       r"wrote docs/neu_det_map_vs_time\.png"),
        setup=("results_tree",), files=("docs/neu_det_map_vs_time.png",)),
    "visionattn bench detectors": Cmd(
        "run", expect=(r"rtdetr_r18", r"dfir_detr"), slow=True, timeout=900),
}


# ---------------------------------------------------------------------------------------------------
# the working folder and the files a user would have before running a command


def _env() -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_workspace(root: Path) -> Path:
    """``root/repo`` laid out as the README's repository root: ``configs`` and ``../shared`` reachable."""
    ws = root / "repo"
    ws.mkdir(parents=True)
    (ws / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED, target_is_directory=True)
    return ws


# short trainer runs that give the commands using runs/cifar10_convit, runs/neu_det_dfir_detr and
# runs/neu_det_rtdetr_r18 their run folder (made once, copied into each working folder): the recipe, 1 step,
# a small validation split
RUN_RECIPES = {
    "cifar10_convit": "visionattn train configs/classification/cifar10_convit.yaml train.max_steps=1 "
                      "train.batch_size=8 data.val_per_class=2",
    "neu_det_dfir_detr": "visionattn train configs/detection/neu_det_dfir_detr.yaml train.max_steps=1 "
                         "train.batch_size=2 data.val_fraction=0.01",
    "neu_det_rtdetr_r18": "visionattn train configs/detection/neu_det_rtdetr_r18.yaml train.max_steps=1 "
                          "train.batch_size=2 data.val_fraction=0.01",
}


class RunBuilder:
    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def __call__(self, name: str) -> Path:
        if name not in self.made:
            ws = make_workspace(self.root / name)
            r = run_to_end(RUN_RECIPES[name], ws, 600)
            assert r.returncode == 0, f"making runs/{name} failed:\n{r.stdout[-3000:]}"
            self.made[name] = ws / "runs" / name
        return self.made[name]


def _copy_run(name: str) -> Callable[[Path, RunBuilder], None]:
    def setup(ws: Path, build: RunBuilder) -> None:
        shutil.copytree(build(name), ws / "runs" / name)
    return setup


def _copy_files(dest: str, sources: Callable[[], list[Path]], prefix_folder: bool = False):
    def setup(ws: Path, build: RunBuilder) -> None:
        (ws / dest).mkdir(parents=True, exist_ok=True)
        for src in sources():
            shutil.copy(src, ws / dest / (f"{src.parent.name}_{src.name}" if prefix_folder else src.name))
    return setup


def _bundled_run(as_name: str) -> Callable[[Path, RunBuilder], None]:
    def setup(ws: Path, build: RunBuilder) -> None:  # the bundled model's run folder, as a user's trained run
        shutil.copytree(BUNDLED / "hippocampus_agunet", ws / "runs" / as_name)
    return setup


def _crossval_folders(ws: Path, build: RunBuilder) -> None:
    """Two crossval folders of two folds each, with the metrics.csv rows a trainer writes at its evaluations
    (validation Dice and the training time at that step)."""
    for name, start in (("hippocampus_cv", 0.80), ("hippocampus_cv_monai_unet", 0.75)):
        for k in range(2):
            fold = ws / "runs" / name / f"fold{k}"
            fold.mkdir(parents=True)
            rows = ["step,epoch,split,name,value"]
            for i, step in enumerate((110, 220, 330)):
                rows += [f"{step},{5 * (i + 1)},val,dice,{start + 0.03 * i + 0.01 * k}",
                         f"{step},{5 * (i + 1)},time,train_seconds,{60.0 * (i + 1)}"]
            (fold / "metrics.csv").write_text("\n".join(rows) + "\n")


def _results_tree(ws: Path, build: RunBuilder) -> None:
    (ws / "docs").mkdir(exist_ok=True)
    (ws / "docs" / "results").symlink_to(REPO / "docs" / "results", target_is_directory=True)


SETUPS: dict[str, Callable[[Path, RunBuilder], None]] = {
    "cifar10_convit_run": _copy_run("cifar10_convit"),
    "neu_det_dfir_detr_run": _copy_run("neu_det_dfir_detr"),
    "neu_det_rtdetr_r18_run": _copy_run("neu_det_rtdetr_r18"),
    "my_images": _copy_files("my_images", lambda: [SHARED / "data" / "cifar10_subset" / "train" / c / "0000.jpg"
                                                   for c in ("airplane", "cat", "ship")], prefix_folder=True),
    "neu_images": _copy_files("images", lambda: [SHARED / "data" / "neu_det" / "IMAGES" / f
                                                 for f in ("crazing_1.jpg", "patches_2.jpg", "scratches_10.jpg")]),
    "scans": _copy_files("scans", lambda: sorted((BUNDLED / "samples" / "images").glob("*.nii.gz"))),
    "case_0000": lambda ws, build: shutil.copy(BUNDLED / "samples" / "images" / "hippocampus_015.nii.gz",
                                               ws / "case_0000.nii.gz"),
    "hippocampus_agunet_run": _bundled_run("hippocampus_agunet"),
    # a finished five-fold crossval folder (copies of the bundled model's run as its folds)
    "hippocampus_cv_trained": lambda ws, build: [_bundled_run(f"hippocampus_cv/fold{k}")(ws, build) for k in range(5)],
    "crossval_folders": _crossval_folders,
    "my_run": _bundled_run("my_run"),
    # the README's own export line, which the bundle commands after it use
    "hippocampus_bundle": lambda ws, build: _must_run(
        "visionattn export hippocampus_agunet --format monai-bundle -o hippocampus_bundle", ws),
    # repository paths a command names (visionattn/bundled/samples/images), as at the repository root
    "repo_tree": lambda ws, build: (ws / "visionattn").symlink_to(REPO / "visionattn", target_is_directory=True),
    # the measured runs' records kept in the repository (docs/results: metrics.csv, config.yaml, summary.json)
    "results_tree": _results_tree,
}


def _must_run(command: str, ws: Path) -> None:
    assert command in COMMANDS, command  # a README command, tested in its own right
    r = run_to_end(command, ws, 600)
    assert r.returncode == 0, f"setting up with `{command}` failed:\n{r.stdout[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> RunBuilder:
    return RunBuilder(tmp_path_factory.mktemp("readme_runs"))


# ---------------------------------------------------------------------------------------------------
# running a command line


def _popen(command: str, cwd: Path) -> subprocess.Popen:
    # its own session, so a stop ends torchrun's workers too (the process group, by its id)
    return subprocess.Popen(["bash", "-c", command], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 20)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_to_end(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = _popen(command, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out = proc.stdout.read() if proc.stdout else ""
        raise AssertionError(f"`{command}` did not finish in {timeout} s; its output:\n{out[-3000:]}") from None
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def start_and_stop(command: str, cwd: Path, patterns: tuple[str, ...], timeout: float) -> str:
    """Start ``command``; stop it once its output has matched every pattern in order (the last one is its
    first progress line). Fails if it exits, or runs past ``timeout``, before that."""
    proc = _popen(command, cwd)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    seen, todo, deadline = [], list(patterns), time.monotonic() + timeout
    try:
        while todo:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"`{command}`: no line matching {todo[0]!r} within {timeout} s; its output:\n"
                                     + "".join(seen)[-3000:]) from None
            if line is None:
                proc.wait()
                raise AssertionError(f"`{command}` exited ({proc.returncode}) before printing a line matching "
                                     f"{todo[0]!r}; its output:\n" + "".join(seen)[-3000:])
            seen.append(line)
            if re.search(todo[0], line.rstrip("\n")):
                todo.pop(0)
    finally:
        _stop(proc)
    return "".join(seen)


def _check_output(command: str, out: str, cmd: Cmd, ws: Path) -> None:
    for pattern in cmd.expect:
        assert re.search(pattern, out, re.MULTILINE), f"`{command}`: no output matching {pattern!r}:\n{out[-3000:]}"
    for pattern in cmd.files:
        assert list(ws.glob(pattern)), f"`{command}` did not write {pattern}; output:\n{out[-3000:]}"
    if cmd.check is not None:
        cmd.check(ws)


# ---------------------------------------------------------------------------------------------------
# the set-up lines: checked in place, never reinstalled


def _check_setup_line(command: str, line: int) -> None:
    parts = [p.strip() for p in command.split("&&")]
    assert parts[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], command
    # python3 -m venv: the interpreter has the venv module; . .venv/bin/activate: a venv made that way has it
    r = subprocess.run(["python3", "-c", "import sys, venv; assert sys.version_info >= (3, 10), sys.version"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, f"README.md:{line}: python3 cannot make the venv: {r.stderr}"
    assert (Path(sys.prefix) / "bin" / "activate").is_file() and sys.prefix != sys.base_prefix, (
        "the tests are not running in a venv made by `python3 -m venv`")
    # pip install -e . / -e ".[test]": this checkout is what the environment imports, with the extra it names
    import tomllib

    import visionattn

    assert Path(visionattn.__file__).resolve().is_relative_to(REPO), (
        f"visionattn is imported from {visionattn.__file__}, not from an editable install of {REPO}")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    install = parts[2]
    m = re.fullmatch(r"pip install -e (\.|\"\.\[(\w+)\]\")", install)
    assert m, f"README.md:{line}: unexpected install step {install!r}"
    if m.group(2):
        assert m.group(2) in extras, f"README.md:{line}: pyproject.toml has no [{m.group(2)}] extra"
    rest = " && ".join(parts[3:])
    if rest == "python -m pytest -q -n auto":
        # .ci/run reads the line after <!-- test-command --> and runs it in a fresh clone: it must be this one
        program = re.search(r"^cmd=\$\(awk '([^']+)' README\.md\)$", (REPO / ".ci" / "run").read_text(), re.MULTILINE)
        assert program, ".ci/run no longer reads its command with `cmd=$(awk '...' README.md)`: update this test"
        r = subprocess.run(["awk", program.group(1), str(README)], capture_output=True, text=True, check=False)
        assert r.stdout.strip() == command, f".ci/run would run {r.stdout.strip()!r}, not {command!r}"
    else:
        assert rest in COMMANDS and COMMANDS[rest].mode in ("run", "start"), (
            f"README.md:{line}: the step after the install, {rest!r}, must itself be a run command of COMMANDS")


# ---------------------------------------------------------------------------------------------------
# the tests


def test_every_readme_command_is_accounted_for():
    in_readme = [c for _, c in README_COMMANDS]
    missing = [f"README.md:{line}: {c}" for line, c in README_COMMANDS if c not in COMMANDS]
    assert not missing, "README commands with no entry in COMMANDS (say how each is run):\n" + "\n".join(missing)
    stale = [c for c in COMMANDS if c not in in_readme]
    assert not stale, "COMMANDS entries no longer in README.md (remove them):\n" + "\n".join(stale)
    for c, cmd in COMMANDS.items():
        assert cmd.mode in ("run", "start", "setup", "skip", "gpu"), c
        assert cmd.mode not in ("setup", "skip") or cmd.reason, f"{c}: say why it is not run"
        assert all(s in SETUPS for s in cmd.setup), c


def _command_params():
    params, seen = [], set()
    for line, command in README_COMMANDS:
        if command in seen:  # the same line twice (the demo): run once
            continue
        seen.add(command)
        cmd = COMMANDS.get(command)
        marks = [pytest.mark.slow] if cmd is not None and cmd.slow else []
        params.append(pytest.param(line, command, marks=marks, id=f"L{line}-{command[:60]}"))
    return params


@pytest.mark.parametrize("line, command", _command_params())
def test_readme_command(line, command, tmp_path, runs):
    cmd = COMMANDS.get(command)
    assert cmd is not None, f"README.md:{line}: `{command}` has no entry in COMMANDS: say how it is run"
    if cmd.mode == "skip":
        pytest.skip(f"not run: {cmd.reason}")
    if cmd.mode == "setup":
        _check_setup_line(command, line)
        return
    if cmd.data and not SHARED.joinpath("data").is_dir():
        pytest.skip(f"shared data sets not found at {SHARED / 'data'}")
    ws = make_workspace(tmp_path)
    for name in cmd.setup:
        SETUPS[name](ws, runs)
    if cmd.mode == "gpu":
        import torch

        if torch.cuda.is_available():
            out = start_and_stop(command, ws, cmd.expect, cmd.timeout)
        else:
            r = run_to_end(command, ws, 120)
            assert r.returncode == 2 and "no CUDA device is available" in r.stdout, r.stdout[-3000:]
            assert len(r.stdout.strip().splitlines()) == 1, r.stdout
        return
    if cmd.mode == "start":
        out = start_and_stop(command, ws, cmd.expect, cmd.timeout)
    else:
        r = run_to_end(command, ws, cmd.timeout)
        out = r.stdout
        assert r.returncode == cmd.rc, f"README.md:{line}: `{command}` exited {r.returncode}:\n{out[-3000:]}"
    _check_output(command, out, cmd, ws)


# ---------------------------------------------------------------------------------------------------
# commands quoted inline in the prose (`visionattn ...`): most train for hours or benchmark for minutes, so
# they are not run; each is parsed by the CLI's own parser as written, and what it names is checked: recipes
# load with their overrides (schema and bounds), models are registered. A renamed flag, a stale override key
# or a removed recipe in a sentence fails here.

# words that mark an inline command as a pattern rather than a command (`evaluate RUN`, `train ... data.fold=K`)
INLINE_PLACEHOLDERS = ("RUN", "...", "[", "{", "=K ")


def _without_env(words: list[str]) -> list[str]:
    """A command's words after its leading ``VAR=value`` assignments."""
    while words and re.match(r"^[A-Z_]+=\S+$", words[0]):
        words = words[1:]
    return words


def inline_commands(text: str | None = None) -> list[tuple[int, str]]:
    """The inline code spans of README.md outside fenced blocks that start with ``visionattn`` (after
    ``VAR=value`` assignments), each with its line; a span may run over a line break (Markdown joins it)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    lines, prose, in_fence = text.splitlines(), [], None
    for line in lines:
        m = re.match(r"^(`{3,})", line)
        if m and in_fence is None:
            in_fence = m.group(1)
        elif in_fence is not None and line.startswith(in_fence):
            in_fence = None
        else:
            prose.append(line if in_fence is None else "")
            continue
        prose.append("")
    joined = "\n".join(prose)
    out = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined):
        command = " ".join(m.group(1).split())
        words = _without_env(command.split())
        if words and words[0] == "visionattn" and len(words) > 1:
            out.append((joined.count("\n", 0, m.start()) + 1, command))
    return out


def test_inline_commands_are_found():
    demo = ("Run `visionattn train a.yaml\ntrain.threads=1` or `visionattn`; `GLIBC_TUNABLES=x visionattn list`.\n"
            "```bash\nvisionattn info nope\n```\n`visionattn.create_model` and `visionattn info convit_tiny`\n")
    assert inline_commands(demo) == [(1, "visionattn train a.yaml train.threads=1"),
                                     (2, "GLIBC_TUNABLES=x visionattn list"), (6, "visionattn info convit_tiny")]
    assert len(inline_commands()) >= 25  # the README's


@pytest.mark.parametrize("line, command", inline_commands(), ids=lambda v: str(v)[:70])
def test_inline_readme_command_parses_as_written(line, command, monkeypatch):
    import shlex

    import visionattn
    from visionattn.cli import build_parser, check_spelling
    from visionattn.tasks.config import load_config

    monkeypatch.chdir(README.parent)
    argv = _without_env(shlex.split(command))[1:]
    parser = build_parser()
    if len(argv) == 1 or any(p in f"{command} " for p in INLINE_PLACEHOLDERS):  # a name or a pattern
        assert argv[0] in parser.subcommands, f"README.md:{line}: `{command}`: no subcommand {argv[0]!r}"
        return
    try:
        check_spelling(parser, argv)
        args = parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"README.md:{line}: `{command}` does not parse (exit {e.code})") from None
    if args.command in ("train", "crossval") and not getattr(args, "plot", None):
        load_config(args.config, args.overrides)  # raises ConfigError naming the problem
    if args.command == "bench" and args.what == "train":
        for recipe in args.names:
            load_config(recipe, [])
    if args.command == "bench" and args.what == "models":
        for name in args.names:
            visionattn.get_entry(name)
    if args.command == "info":
        visionattn.get_entry(args.name)
