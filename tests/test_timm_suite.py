"""timm's own model tests (tests/test_models.py from the sdist of the installed timm) on the va_* models, run
by .ci/timm-tests: the whole suite on the smallest model of each configuration of every class, and its
configuration tests on their wider siblings. Skipped, saying why, when the sdist cannot be downloaded (no
network); set TIMM_SDIST to a local timm-<version>.tar.gz to run without one."""
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "timm-tests"
NO_SDIST = 75  # the script's exit status when the sdist cannot be downloaded or used

# tests timm's file runs on every model (va_* models among them), and those it runs on the models of the
# modules in its FEAT_INTER_FILTERS list (every visionattn family, once the script has added them)
PER_MODEL = {"test_model_forward", "test_model_backward", "test_model_forward_torchscript",
             "test_model_forward_fx", "test_model_backward_fx", "test_model_forward_fx_torchscript"}
PER_FEATURE_MODEL = {"test_model_forward_intermediates", "test_model_forward_intermediates_features",
                     "test_prune_intermediate_layers_contract"}


@functools.lru_cache(maxsize=1)
def _sdist() -> str | None:
    """timm's sdist, downloaded once per process for all the parts (None: let the script try and say why)."""
    if os.environ.get("TIMM_SDIST"):
        return os.environ["TIMM_SDIST"]
    import tempfile

    import timm

    folder = tempfile.mkdtemp(prefix="visionattn-timm-sdist-")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"timm=={timm.__version__}", "-d", folder], capture_output=True, text=True)
    found = sorted(Path(folder).glob("timm-*.tar.gz"))
    return str(found[0]) if r.returncode == 0 and found else None


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, COLUMNS="1000")  # pytest's report lines are not cut short
    if _sdist():
        env["TIMM_SDIST"] = _sdist()
    r = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode == NO_SDIST:
        pytest.skip(f"timm's sdist is not available: {r.stderr.strip().splitlines()[-1]}")
    return r


def _tail(r: subprocess.CompletedProcess, n: int = 60) -> str:
    return "\n".join((r.stdout + r.stderr).splitlines()[-n:])


def test_runner_selects_every_va_model_and_leaves_out_the_network():
    """The selection alone (collect-only): every va_* model in every per-model test, nothing of timm's models,
    no pretrained-download test."""
    import timm

    import visionattn

    visionattn.list_models()  # registers the va_* models in timm
    va_models = {n for n in timm.list_models() if n.startswith("va_")}
    r = _run("--collect-only", timeout=600)
    assert r.returncode == 0, _tail(r)
    ids = [line for line in r.stdout.splitlines() if line.startswith("tests/test_models.py::")]
    by_test: dict[str, set[str]] = {}
    for node in ids:
        test, params = re.fullmatch(r"tests/test_models\.py::(\w+)\[(.*)\]", node).groups()
        model = next(p for p in params.split("-") if p.startswith("va_"))
        by_test.setdefault(test, set()).add(model.split(".")[0])
    for test in PER_MODEL | PER_FEATURE_MODEL:
        assert by_test.get(test) == va_models, (test, va_models - by_test.get(test, set()))
    assert by_test["test_model_default_cfgs"] | by_test["test_model_default_cfgs_non_std"] == va_models
    assert not {"test_model_load_pretrained", "test_model_features_pretrained", "test_model_inference"} & set(by_test)
    assert "network-only tests on va_* models deselected" in r.stdout


# timm's suite in parts of about equal time, so that `pytest -n` spreads it over the cores. A part is a -k
# expression over model names and, optionally, one over test names. The whole suite runs on the smallest model
# of each configuration of every class (ConViT-Ti; NiNformer and Activator at 32 and 224; BiFormer-T and its
# Swin-layout STL; both Gated-SwinRMT mixers at 32 and 224 tiny). Their wider siblings (the same classes with
# more channels, heads or blocks) get the tests that read their own configuration (default cfgs, a forward pass
# at their input size, their feature maps where timm tests them), not the backward, TorchScript, FX and
# intermediate-feature tests their smaller siblings pass on the same code: those took over 20 CPU-minutes of CI
# for them (the ConViTs at a fixed 224 input).
# timm's own CI leaves its largest models out of its suite the same way. Every va_* model belongs to exactly
# one part (checked below).
WIDER_VARIANTS = ("va_convit_tiny_plus or va_convit_small or va_convit_base or va_ninformer_b16 or va_biformer_small "
                  "or va_biformer_base or va_gated_swinrmt_swat_small or va_gated_swinrmt_retention_small "
                  "or (va_gated_swinrmt and not va_gated_swinrmt_swat_ and not va_gated_swinrmt_retention_)")
CONFIGURATION_TESTS = "(default_cfgs or test_model_forward) and not torchscript and not fx and not intermediates"
SUITE_PARTS: dict[str, tuple[str, str | None]] = {  # longest first
    "wider-variants-configuration": (WIDER_VARIANTS, CONFIGURATION_TESTS),
    "convit": ("va_convit_tiny and not va_convit_tiny_plus", None),
    "ninformer": ("va_ninformer and not va_ninformer_b16", None),
    "swinrmt-swat": ("va_gated_swinrmt_swat_cifar or va_gated_swinrmt_swat_tiny", None),
    "swinrmt-retention": ("va_gated_swinrmt_retention_cifar or va_gated_swinrmt_retention_tiny", None),
    "biformer": ("va_biformer_tiny or va_biformer_stl", None),
    "activator": ("va_activator", None),
}
WIDER = {"va_convit_tiny_plus", "va_convit_small", "va_convit_small_plus", "va_convit_base", "va_convit_base_plus",
         "va_ninformer_b16_224", "va_biformer_small", "va_biformer_base", "va_gated_swinrmt_swat_small",
         "va_gated_swinrmt_swat", "va_gated_swinrmt_retention_small", "va_gated_swinrmt_retention"}


def _part_models(expression: str, names: set[str]) -> set[str]:
    """The model names a part's model expression selects (its words are substrings, joined by and/or/not)."""
    import ast

    code = re.sub(r"\b(va_\w+)\b", lambda m: repr(m.group(1)) + " in name", expression)
    tree = compile(ast.parse(code, mode="eval"), "<part>", "eval")
    return {name for name in names if eval(tree, {}, {"name": name})}


def _part_keyword(part: str) -> str:
    models, tests = SUITE_PARTS[part]
    return models if tests is None else f"({models}) and ({tests})"


def test_suite_parts_cover_every_va_model_once():
    import timm

    import visionattn

    visionattn.list_models()
    va_models = {n for n in timm.list_models() if n.startswith("va_")}
    seen: dict[str, list[str]] = {}
    for part, (expression, _) in SUITE_PARTS.items():
        for name in _part_models(expression, va_models):
            seen.setdefault(name, []).append(part)
    assert set(seen) == va_models, sorted(va_models - set(seen))
    assert all(len(parts) == 1 for parts in seen.values()), {n: p for n, p in seen.items() if len(p) > 1}
    # only the wider variants are left out of the full suite, and each is of a model class fully tested in it
    wider = _part_models(WIDER_VARIANTS, va_models)
    assert wider == WIDER, wider ^ WIDER
    from visionattn.registry import get_entry

    fully_tested_classes = {get_entry(n[len("va_"):]).model_cls for n in va_models - wider}
    assert all(get_entry(n[len("va_"):]).model_cls in fully_tested_classes for n in wider)


@pytest.mark.slow
@pytest.mark.parametrize("part", list(SUITE_PARTS))
def test_timm_model_suite_passes(part):
    """timm's test_models.py on the va_* models of one part: all pass (the parts together: every va_* model,
    about 7 minutes of one CPU core in all, measured in CI on 2026-12-02)."""
    r = _run("-k", _part_keyword(part), "-rA", timeout=3600)  # -rA: a line per test, passed ones too
    summary = (r.stdout.strip().splitlines() or [""])[-1]
    assert r.returncode == 0, _tail(r)
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary
    passed = re.findall(r"^PASSED tests/test_models\.py::(\w+)\[(.*)\]", r.stdout, re.M)
    if SUITE_PARTS[part][1] is not None:  # the wider variants: the configuration tests only, on every one
        assert {test for test, _ in passed} == {"test_model_forward", "test_model_forward_features",
                                                "test_model_default_cfgs", "test_model_default_cfgs_non_std"}, passed
        assert {re.search(r"(va_\w+)", p).group(1).split(".")[0] for _, p in passed} == WIDER, passed
