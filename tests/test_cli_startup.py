"""The command as users start it: `visionattn --help` and `visionattn list` without torch (lazy imports, a static
model table kept equal to the registry), `import visionattn` still registering in timm, aligned `list` columns,
and "did you mean" for mistyped subcommands and options."""
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

import visionattn.cli as cli

HEAVY = ("torch", "timm", "torchvision", "monai", "numpy")


def _python(code: str, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``code`` in a fresh interpreter; returns the result and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


STARTUP = """
import json, sys
import visionattn.cli
try:
    rc = visionattn.cli.main({argv!r})
except SystemExit as e:  # --help
    rc = e.code
print(json.dumps({{"rc": rc, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "convit*", "--task", "classification"]])
def test_help_and_list_start_without_torch_in_under_a_second_of_cpu(argv):
    r, cpu = _python(STARTUP.format(argv=argv, heavy=HEAVY), "-X", "importtime")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}, result
    # -X importtime: "import time: self [us] | cumulative | imported package", one line per module
    import_us = sum(int(line.split("|")[0].split(":")[1]) for line in r.stderr.splitlines()
                    if line.startswith("import time:") and line.split("|")[0].split(":")[1].strip().isdigit())
    assert import_us < 1_000_000, f"imports took {import_us / 1e6:.2f} s"
    assert cpu < 1.0, f"{argv}: {cpu:.2f} s of CPU"


def test_the_console_script_starts_without_torch():
    script = Path(sys.executable).with_name("visionattn")
    if not script.is_file():
        pytest.skip("no visionattn console script beside this interpreter")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for argv in (["--help"], ["list"]):
        r = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) < 2.0  # both together


@pytest.mark.parametrize("code", [
    # visionattn first, timm after: the import hook registers the models once timm is imported
    "import sys, visionattn\nassert 'torch' not in sys.modules and 'timm' not in sys.modules\nimport timm",
    # a submodule whose own import brings timm in: registration waits until that import is complete
    "from visionattn.layers import NeighborhoodAttention2d\nimport timm",
    # the registry used directly (as a recipe's _target_ does) sees every model
    "from visionattn.registry import get_entry\nassert get_entry('agunet_3d').task == 'segmentation'\nimport timm",
])
def test_import_visionattn_still_registers_in_timm(code):
    r, _ = _python(code + "\nassert timm.is_model('va_convit_tiny') and timm.is_model('va_ninformer_cifar')\n"
                          "import visionattn\nassert len(visionattn.list_models()) >= 30\n"
                          "assert type(timm.create_model('va_activator_glu_cifar')).__name__ == 'Activator'\n")
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_static_model_table_is_the_live_registry():
    import visionattn
    from visionattn._model_index import MODELS

    live = [(n, visionattn.get_entry(n).task, visionattn.get_entry(n).timm_name) for n in visionattn.list_models()]
    assert list(MODELS) == live, ("visionattn/_model_index.py is stale: rewrite it with "
                                  "python -c 'import visionattn.cli as c; c.write_model_index()'")
    assert cli.MODEL_INDEX.read_text(encoding="utf-8") == cli.model_index_source()


def _columns(line: str, starts: list[int]) -> list[str]:
    return [line[a:b].rstrip() for a, b in zip(starts, starts[1:] + [None])]


def test_list_prints_a_header_and_aligned_columns(capsys, monkeypatch):
    import visionattn
    import visionattn._model_index as index

    assert cli.main(["list"]) == 0
    header, rule, *rows = capsys.readouterr().out.splitlines()
    starts = [header.index("name"), header.index("task"), header.index("timm name")]
    assert starts[0] == 0 and [len(r) for r in rule.split()] == [starts[1] - 2, starts[2] - starts[1] - 2, len(rule) - starts[2]]
    table = [_columns(r, starts) for r in rows]
    assert [t[0] for t in table] == visionattn.list_models()
    for (name, task, timm_name), row in zip(table, rows):
        assert " " not in name and task in ("classification", "segmentation", "detection")
        assert timm_name == (visionattn.get_entry(name).timm_name or "-")
        assert row[starts[1] - 2:starts[1]] == "  " and row[starts[2] - 2:starts[2]] == "  "

    long = "a_model_name_far_longer_than_any_registered_one_" * 2
    monkeypatch.setattr(index, "MODELS", index.MODELS + ((long, "segmentation", None), ("z", "detection", "va_z")))
    assert cli.main(["list"]) == 0
    header, rule, *rows = capsys.readouterr().out.splitlines()
    starts = [header.index("name"), header.index("task"), header.index("timm name")]
    assert starts[1] == len(long) + 2
    assert _columns(rows[-2], starts) == [long, "segmentation", "-"] and _columns(rows[-1], starts) == ["z", "detection", "va_z"]


def test_list_filters_as_the_registry_does(capsys):
    import visionattn

    for argv, expected in ((["va_convit_t*"], visionattn.list_models("va_convit_t*")),
                           (["*", "--task", "detection"], visionattn.list_models(task="detection"))):
        assert cli.main(["list", *argv]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == expected
    assert cli.main(["list", "no_such*"]) == 1
    assert "no model matches" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["lst"], ["invalid choice: 'lst'", "did you mean list?"]),
    (["evalute", "runs/x"], ["did you mean evaluate?"]),
    (["bench", "models", "convit_tiny", "--min-tmie", "1"], ["unrecognized arguments: --min-tmie", "--min-time"]),
    (["train", "recipe.yaml", "--resme"], ["--resume"]),
    (["predict", "run", "--inptu", "x"], ["--input"]),  # before argparse complains that -i is missing
    (["--hepl"], ["--help"]),
    (["segment", "--treads", "2"], ["unrecognized arguments: --treads", "did you mean --threads"]),
    (["segment", "--devcie", "cpu"], ["did you mean --device"]),
])
def test_typos_get_a_did_you_mean_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "usage: visionattn" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["train", "recipe.yaml", "train.lr=-1", "--resume", "train.epochs=2"],  # overrides are not options
    ["bench", "models", "convit_tiny", "--min", "1"],  # an unambiguous prefix, which argparse accepts
    ["predict", "run", "-iimages", "-o", "out.csv"],  # a short option with its value attached
    ["segment", "--overlap", "-0.5"],  # a negative number is a value
    ["segment", "--device", "auto", "--threads", "2"],
    ["train", "recipe.yaml", "--", "--not-an-option"],
])
def test_spelling_check_leaves_valid_command_lines_alone(argv):
    cli.check_spelling(cli.build_parser(), argv)


def test_a_process_in_a_group_leaves_with_its_code_and_its_output(tmp_path):
    """``runtime.leave`` in a process that joined a gloo group: the group is destroyed, what was printed (a
    pipe buffers it) still arrives, the exit status is the command's, and the interpreter is not finalized
    (an atexit handler registered after the group does not run: the process ended by ``os._exit``). Outside
    a group it is a plain ``sys.exit``, which does finalize."""
    import os
    import subprocess
    import sys

    def run(group: bool, code: int):
        script = ("import atexit, torch.distributed as dist\n"
                  "from visionattn.tasks import runtime\n"
                  + (f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
                     if group else "")
                  + "atexit.register(lambda: print(' finalized', end=''))\n"
                  "print('done', end='')\n"
                  f"runtime.leave({code})\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: buffered
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)

    r = run(True, 3)
    assert (r.returncode, r.stdout) == (3, "done"), r.stderr[-2000:]
    r = run(False, 4)
    assert (r.returncode, r.stdout) == (4, "done finalized"), r.stderr[-2000:]

