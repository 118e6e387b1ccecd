"""The README's model table is generated from the registry (``python -m visionattn.tasks.readme_tables --write``):
it must be current, list every registered model, and its counts must be the models' own. Numbers the table
provides are not typed anywhere else by hand; where prose keeps one for its argument, it is checked here."""
import difflib
import importlib
import re
from pathlib import Path

import pytest

import visionattn
from visionattn import registry
from visionattn.tasks import readme_tables

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def rows():
    return {row["name"]: row for row in readme_tables.model_rows()}


def readme_block() -> str:
    return readme_tables.read_block(README.read_text(encoding="utf-8"))


def test_every_registered_model_is_in_the_readme_table():
    listed = readme_tables.table_names(readme_block())
    registered = visionattn.list_models()
    missing = [name for name in registered if name not in listed]
    unknown = [name for name in listed if name not in registered]
    assert not missing, (f"registered models missing from README.md's model table: {', '.join(missing)}; "
                         f"run `{readme_tables.COMMAND}`")
    assert not unknown, f"README.md's model table lists models that are not registered: {', '.join(unknown)}"
    assert len(listed) == len(set(listed)), "README.md's model table lists a model twice"


def test_readme_table_is_the_generated_one(rows):
    expected = readme_tables.render_table(list(rows.values()))
    current = readme_block()
    if current != expected:
        diff = "".join(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                            "README.md", "generated"))
        pytest.fail(f"README.md's model table is out of date; run `{readme_tables.COMMAND}`\n{diff}")


@pytest.mark.parametrize("name", ["activator_cifar", "ninformer_cifar", "gated_swinrmt_swat_cifar"])
def test_counts_on_meta_equal_model_info_on_real_tensors(rows, name):
    info = visionattn.model_info(name)  # built on the CPU, run on real tensors
    assert rows[name]["params"] == info["params"]
    assert rows[name]["flops"] == info["flops"]
    assert rows[name]["input_size"] == tuple(info["input_size"])


def test_block_replacement_round_trips():
    text = "intro\n" + readme_tables.START + "\nold\n" + readme_tables.END + "\nafter\n"
    new = readme_tables.replace_block(text, "| a |\n")
    assert new == "intro\n" + readme_tables.START + "\n| a |\n" + readme_tables.END + "\nafter\n"
    assert readme_tables.read_block(new) == "| a |\n"
    with pytest.raises(ValueError, match="exactly once"):
        readme_tables.read_block("no markers here")


def test_cli_check_and_print(capsys, tmp_path, monkeypatch):
    table = "| model |\n|---|\n| x |\n"
    monkeypatch.setattr(readme_tables, "model_rows", lambda: [])
    monkeypatch.setattr(readme_tables, "render_table", lambda rows: table)
    monkeypatch.setattr(readme_tables, "bench_tables", lambda: {})  # the model table only
    monkeypatch.setattr(readme_tables, "results_tables", lambda: {})
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{readme_tables.START}\nstale\n{readme_tables.END}\n")
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert readme_tables.main(["--write", "--readme", str(readme)]) == 0
    assert readme.read_text() == f"a\n{readme_tables.START}\n{table}{readme_tables.END}\n"
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 0


# A count typed into free text: "5.7M params", "2.65M parameters", "14.0 GFLOPs", "8.21 GMACs", "0.84G MACs".
COUNT_IN_WORDS = re.compile(r"\d[\d,.]*\s*[MKG]?\s*(params|parameters|GFLOPs|GMACs|MACs|FLOPs)\b", re.IGNORECASE)


@pytest.mark.parametrize("name", visionattn.list_models())
def test_registrations_type_no_counts(name):
    """Counts come from the model; published figures go in ``reported``, not in notes or the constructor's
    docstring."""
    entry = registry.get_entry(name)
    for where, text in (("notes", entry.notes), ("docstring", entry.fn.__doc__ or "")):
        found = COUNT_IN_WORDS.search(text)
        assert found is None, f"{name}: its {where} types a count ({found.group(0)!r}); use ReportedFigures or drop it"


def _words(text: str) -> str:
    return " ".join(text.split())


# Counts that prose keeps because its argument needs them (module docstrings, README paragraphs): each must be
# the counted value. (where, model, expected text from the model's row)
PROSE_COUNTS = [
    ("visionattn.decoders.herseg", "herseg", lambda r: f"Sizes: {r['params']:,} parameters with ``out_channels=1``"),
    ("visionattn.decoders.herseg", "herseg", lambda r: f"{r['gmacs']:.2f} GMACs, i.e. {r['flops'] / 1e9:.2f} GFLOPs"),
    ("visionattn.detectors.dfir_detr", "dfir_detr",
     lambda r: f"``dfir_detr`` has {r['params'] / 1e6:.2f}M parameters (80 classes"),
    ("visionattn.detectors.dfir_detr", "dfir_detr", lambda r: f"and {r['flops'] / 1e9:.1f} GFLOPs at 640"),
    ("visionattn.backbones.activator", "activator_cifar", lambda r: f"{r['params'] / 1e6:.3f}M parameters with FFN"),
    ("visionattn.backbones.activator", "activator_glu_cifar", lambda r: f"{r['params'] / 1e6:.3f}M GLU-only"),
    ("visionattn.backbones.ninformer", "ninformer_cifar",
     lambda r: f"has {r['params'] / 1e6:.2f}M parameters at 10 classes"),
    ("README.md", "herseg",
     lambda r: (f"`visionattn info herseg`: {r['params']:,} parameters and {r['gmacs']:.2f} GMACs "
                f"({r['flops'] / 1e9:.2f} GFLOPs")),
    ("README.md", "herseg", lambda r: f'"herseg", in_channels=3, out_channels=1) # {r["params"] / 1e6:.2f}M params'),
    ("README.md", "ninformer_cifar", lambda r: f"| NiNformer ({r['params'] / 1e6:.2f}M) |"),  # the recipes' table
    ("README.md", "activator_cifar", lambda r: f"| Activator ({r['params'] / 1e6:.2f}M) |"),
]


@pytest.mark.parametrize("where,name,expected", PROSE_COUNTS,
                         ids=[f"{where}:{name}:{i}" for i, (where, name, _) in enumerate(PROSE_COUNTS)])
def test_counts_kept_in_prose_are_the_counted_ones(rows, where, name, expected):
    text = README.read_text(encoding="utf-8") if where == "README.md" else importlib.import_module(where).__doc__
    wanted = expected(rows[name])
    assert _words(wanted) in _words(text), f"{where} should say {wanted!r} (counted from {name})"


def test_released_code_parameter_counts_are_ours(rows):
    """Where the released code gives a parameter count for the configuration we register, we match it."""
    checked = 0
    for name, row in rows.items():
        for figure in row["reported"]:
            if "code" in figure.source and not figure.setting and isinstance(figure.params_m, float):
                assert row["params"] / 1e6 == pytest.approx(figure.params_m, rel=1e-3), (name, figure)
                checked += 1
    assert checked >= 3


def test_benchmark_tables_are_the_rendered_benchmark_json():
    """Each README performance table is what the benchmark's own JSON renders to, and the JSON covers the
    benchmark's standard problems with every alternative the table has a column for."""
    import json

    from visionattn.tasks.bench import DEFAULT_KERNEL_PROBLEMS

    text = README.read_text(encoding="utf-8")
    for name, table in readme_tables.bench_tables().items():
        current = readme_tables.read_block(text, *readme_tables.bench_markers(name))
        assert current == table, (
            f"README.md's {name} table is not the rendering of docs/bench/{readme_tables.BENCH_TABLES[name][0]}; "
            f"run `{readme_tables.COMMAND}`:\n" + "".join(difflib.unified_diff(
                current.splitlines(True), table.splitlines(True), "README.md", "generated")))
    rows = json.loads((readme_tables.BENCH_DIR / "kernels-cpu.json").read_text())
    measured = {(r["problem"], r["impl"]) for r in rows}
    for problem in DEFAULT_KERNEL_PROBLEMS:
        assert (problem, "visionattn-torch") in measured and (problem, "naive-gather") in measured, problem
    assert all(0 < r["fwd_ms"] for r in rows)
    # the two kernel tables differ only in the allocator's thresholds, which their rows record
    assert all(r["machine"]["allocator"].endswith("(default thresholds)") for r in rows)
    tuned = json.loads((readme_tables.BENCH_DIR / "kernels-cpu-malloc.json").read_text())
    assert {(r["problem"], r["impl"]) for r in tuned} == measured
    assert all("mmap_threshold=268435456, trim_threshold=1073741824" in r["machine"]["allocator"] for r in tuned)


def test_kernels_table_rendering_reads_the_fields_it_names():
    row = dict(fwd_ms=2.0, fwdbwd_ms=8.0, bwd_over_fwd=3.0, fwd_ceiling_fraction=0.125, fwd_ratio=1.0,
               fwdbwd_ratio=1.0)
    rows = [dict(row, problem="2d-56-k7", impl="visionattn-torch"),
            dict(row, problem="2d-56-k7", impl="naive-gather", fwd_ratio=30.0, fwdbwd_ratio=20.0),
            dict(row, problem="2d-56-k7", impl="flex-attention-compiled", fwd_ratio=9.0),
            dict(row, problem="2d-56-k7", impl="flex-attention-tiled", fwd_ratio=4.0)]
    table = readme_tables.render_kernels_table(rows, "CMD")
    line = table.splitlines()[2]
    assert line == "| 2-D 56x56, K=7 | 2 ms | 30x | - | 4.0x | 8 ms | 20x | 3.00 | 12.5% |"
    assert table.rstrip().endswith("Measured by `CMD`; ratio = alternative's time / ours (above 1: ours is faster).")


def test_tables_name_the_machine_their_rows_were_measured_on():
    """A bench table says where it was measured (the rows' ``machine`` record), once per distinct machine;
    rows from before the record render no line."""
    machine = dict(cpu="AMD EPYC", cpu_capability="AVX2", logical_cpus=2, torch_threads=1, torch="2.14.1")
    rows = [dict(model="rtdetr_r18", machine=machine), dict(model="dfir_detr", machine=machine)]
    assert readme_tables.machine_line(rows) == (
        "Machine: AMD EPYC (AVX2), 2 logical CPUs, 1 torch thread, torch 2.14.1.\n")
    other = dict(machine, cpu_capability="AVX512", torch_threads=2)
    assert readme_tables.machine_line([rows[0], dict(model="x", machine=other)]).count("logical CPUs") == 2
    assert readme_tables.machine_line([dict(model="rtdetr_r18")]) == ""
    tuned = dict(machine, allocator="glibc 2.36 malloc (mmap_threshold=268435456)")
    assert readme_tables.machine_line([dict(model="x", machine=tuned)]).endswith(
        "torch 2.14.1, glibc 2.36 malloc (mmap_threshold=268435456).\n")



def test_cross_validation_tables_are_the_rendered_reports():
    """The README's cross-validation tables are what their reports in docs/results render to (no hand copy),
    and the rendering reads each fold's cases, steps and figures from them."""
    text = README.read_text(encoding="utf-8")
    for name, table in readme_tables.results_tables().items():
        current = readme_tables.read_block(text, *readme_tables.results_markers(name))
        assert current == table, f"README.md's {name} table is not the rendering of its reports; run `{readme_tables.COMMAND}`"
    report = {"folds": {"0": {"steps": 1374, "dice_vessel": 0.7393, "nsd_vessel": 0.77},
                        "1": {"steps": 1288, "dice_vessel": 0.8167, "nsd_vessel": 0.85}},
              "per_case": [{"case": c, "fold": f} for c, f in (("9", 1), ("25", 0), ("10", 1), ("34", 0))],
              "cases": 4, "case_weighted_mean": {"dice_vessel": 0.778, "nsd_vessel": 0.81}, "std": {"dice_vessel": 0.055}}
    tta = {**report, "folds": {"0": {"dice_vessel": 0.7428}, "1": {"dice_vessel": 0.8192}},
           "case_weighted_mean": {"dice_vessel": 0.781}}
    lines = readme_tables.render_vessel_crossval_table(report, tta).splitlines()
    assert lines[2] == "| 0 (the fixed split) | 25, 34 | 1,374 | 0.739 | 0.743 | 0.770 |"
    assert lines[3] == "| 1 | 9, 10 | 1,288 | 0.817 | 0.819 | 0.850 |"
    assert lines[4] == "| all 4 images | | | **0.778** +- 0.055 | **0.781** +- 0.055 | 0.810 |"


def test_labels_cross_validation_table_reads_folds_steps_and_figures():
    """A multi-label table row: the folds as a span, steps as a range, mean +- std over folds for Dice, the mean
    NSD; a row of one fold picked from a report shows that fold's figures alone, without a spread."""
    fold = {"0": dict(dice=0.88, dice_anterior=0.89, dice_posterior=0.87, nsd_anterior=0.95, nsd_posterior=0.94,
                      cases=2, steps=3683),
            "1": dict(dice=0.90, dice_anterior=0.91, dice_posterior=0.89, nsd_anterior=0.96, nsd_posterior=0.97,
                      cases=2, steps=3219)}
    mean = {k: (fold["0"][k] + fold["1"][k]) / 2 for k in fold["0"] if k.startswith(("dice", "nsd"))}
    report = {"folds": fold, "mean": {**mean, "dice_pooled": 0.5, "dice_pooled_anterior": 0.5},
              "std": {k: 0.01 for k in mean}, "cases": 4, "tta_mirror_axes": [0]}
    rows = [("net", 4, report), ("net", 8, readme_tables._one_fold({**report, "tta_mirror_axes": []}, "1"))]
    lines = readme_tables.render_labels_crossval_table(rows).splitlines()
    assert lines[0] == ("| network | batch | folds | steps per fold | TTA | Dice anterior | Dice posterior | mean Dice "
                        "| NSD anterior | NSD posterior |")
    assert lines[2] == ("| net, 2-fold CV, 4 cases | 4 | 0-1 | 3,219-3,683 | mirroring | 0.900 +- 0.010 | 0.880 +- 0.010 "
                        "| 0.890 +- 0.010 | 0.955 | 0.955 |")
    assert lines[3] == "| net, fold 1 | 8 | 1 | 3,219 | none | 0.910 | 0.890 | 0.900 | 0.960 | 0.970 |"
    assert readme_tables._fold_span(["0", "2", "4"]) == "0, 2, 4"
