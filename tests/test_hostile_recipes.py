"""Hostile recipes, overrides and run folders: nothing in them may run code, touch a file or fetch anything.

Every payload here writes a marker file (or imports a module that would) when built by a naive resolver
(import the longest module prefix, walk attributes, call): ``test_payloads_work_against_a_naive_resolver``
shows that they are real. The other tests feed the same payloads to every entry point that reads a recipe
or a run folder and check that each is refused, with a clear error and before anything runs.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import time
import types

import pytest
import yaml

from visionattn.cli import main
from visionattn.tasks import config as config_module
from visionattn.tasks.config import ConfigError, load_config, load_run_config, resolve_target, validate


# ---------------------------------------------------------------------------------------------------
# payloads: each a function of the marker path -> a `_target_` node


def _partial_writer(marker):
    return {"_target_": "visionattn.tasks.files.write_text_atomic", "_partial_": True, "path": str(marker)}


PAYLOADS = {
    # a file writer of our own package (allowed prefix, its module is not a "code runner")
    "own_file_writer": lambda m: {"_target_": "visionattn.tasks.files.write_text_atomic", "text": "x", "path": str(m)},
    "own_torch_save": lambda m: {"_target_": "visionattn.tasks.runtime.atomic_torch_save", "obj": {"a": 1}, "path": str(m)},
    # pathlib.Path reached through one of our modules
    "pathlib_through_our_module": lambda m: {
        "_target_": "visionattn.tasks.segment.Path.write_text",
        "_args_": [{"_target_": "visionattn.tasks.segment.Path", "_args_": [str(m)]}, "x"]},
    # allowed packages' own functions with side effects
    "albumentations_serialization_save": lambda m: {
        "_target_": "albumentations.core.serialization.save",
        "transform": {"_target_": "albumentations.HorizontalFlip"}, "filepath_or_buffer": str(m)},
    "monai_save_state": lambda m: {"_target_": "monai.networks.utils.save_state",
                                   "src": {"_target_": "torch.nn.Identity"}, "path": str(m)},
    "monai_convert_to_torchscript": lambda m: {"_target_": "monai.networks.utils.convert_to_torchscript",
                                               "model": {"_target_": "torch.nn.Identity"}, "filename_or_obj": str(m)},
    "timm_update_summary": lambda m: {"_target_": "timm.utils.update_summary", "epoch": 0,
                                      "train_metrics": {"a": 1}, "eval_metrics": {"b": 2}, "filename": str(m)},
    # a name-to-object resolver imported by a module of an allowed package: imports any module on sys.path
    "monai_optional_import": lambda m: {"_target_": "monai.transforms.utils.optional_import", "module": "va_evil_module"},
    # targets that call a callable they are given
    "monai_apply_transform": lambda m: {"_target_": "monai.transforms.apply_transform",
                                        "transform": _partial_writer(m), "data": "x"},
    "torchvision_lambda": lambda m: {"_target_": "monai.transforms.apply_transform", "data": "x",
                                     "transform": {"_target_": "torchvision.transforms.Lambda", "lambd": _partial_writer(m)}},
    "monai_lambda": lambda m: {"_target_": "monai.transforms.apply_transform", "data": "x",
                               "transform": {"_target_": "monai.transforms.Lambda", "func": _partial_writer(m)}},
    # the command-line entry point
    "cli_main": lambda m: {"_target_": "visionattn.cli.main", "argv": ["segment", "-o", str(m)]},
}
# refused as well, but their effect (the network, a huge sleep, MONAI's debugger) is not something a test
# should trigger even naively
REFUSED_ONLY = {
    "albumentations_lambda": {"_target_": "albumentations.Lambda", "name": "x",
                              "image": {"_target_": "visionattn.tasks.files.write_text_atomic", "_partial_": True}},
    "timm_create_model_pretrained": {"_target_": "timm.create_model", "model_name": "resnet18", "pretrained": True},
    "timm_dataset_download": {"_target_": "timm.data.create_dataset", "name": "torch/cifar10", "root": "/tmp/x",
                              "download": True},
    "visionattn_create_model_pretrained": {"_target_": "visionattn.create_model", "name": "convit_tiny", "pretrained": True},
    "pretrained_overlay_file": {"_target_": "visionattn.create_model", "name": "convit_tiny",
                                "pretrained_cfg_overlay": {"file": "/etc/passwd"}},
    "emcad_pretrained_encoder": {"_target_": "visionattn.decoders.EMCADNet", "pretrained_encoder": True},
    "monai_download_by_default": {"_target_": "monai.networks.nets.EfficientNetBN", "model_name": "efficientnet-b0"},
    "monai_torchvision_by_name": {"_target_": "monai.transforms.TorchVision", "name": "Lambda"},
    "monai_load_image": {"_target_": "monai.transforms.LoadImage"},
    "monai_save_image": {"_target_": "monai.transforms.SaveImage", "output_dir": "/tmp/x"},
    "monai_delay": {"_target_": "monai.transforms.SimulateDelay", "delay_time": 100000},
    "lambda_lr": {"_target_": "torch.optim.lr_scheduler.LambdaLR", "lr_lambda": {"_target_": "torch.nn.Identity"}},
    "albumentations_fda_reads_files": {"_target_": "albumentations.FDA", "reference_images": ["/etc/passwd"]},
    "forward_hook_registry": {"_target_": "torch.nn.modules.module.register_module_forward_hook",
                              "hook": {"_target_": "torch.nn.Identity"}},
    "torch_load_through_timm": {"_target_": "timm.models.resnet.torch.load", "f": "/tmp/x"},
    "os_through_torch_nn": {"_target_": "torch.nn.modules.module.os.system", "command": "true"},
    "dunder_globals": {"_target_": "torch.nn.Module.__init__.__globals__"},
    "builtins_eval": {"_target_": "builtins.eval", "_args_": ["1"]},
    "monai_mode_debug": {"_target_": "torch.nn.Identity", "_mode_": "debug"},
    "monai_expression": {"_target_": "torch.nn.Identity", "x": "$__import__('os').system('true')"},
    "timm_load_checkpoint": {"_target_": "timm.models.load_checkpoint", "model": {"_target_": "torch.nn.Identity"},
                             "checkpoint_path": "/tmp/x"},
}


def _naive_resolve(target: str):
    """What a recipe loader without these rules does: the longest importable prefix, then attributes."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for part in parts[i:]:
        obj = getattr(obj, part)
    return obj


def _naive_build(node):
    if isinstance(node, list):
        return [_naive_build(v) for v in node]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: _naive_build(v) for k, v in node.items()}
    fn = _naive_resolve(node["_target_"])
    kwargs = {k: _naive_build(v) for k, v in node.items() if k not in ("_target_", "_args_", "_partial_")}
    args = [_naive_build(v) for v in node.get("_args_", [])]
    if node.get("_partial_"):
        import functools

        return functools.partial(fn, *args, **kwargs)
    return fn(*args, **kwargs)


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module on sys.path (as the current folder is for `python -m visionattn`) that writes a marker when
    imported: what a downloaded recipe could ship beside itself."""
    marker = tmp_path / "imported"
    (tmp_path / "va_evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("va_evil_module", None)
    yield marker
    sys.modules.pop("va_evil_module", None)


def _marker_for(name, tmp_path, evil_module):
    return evil_module if name == "monai_optional_import" else tmp_path / f"marker_{name}"


NAIVE_PROOF = [n for n in PAYLOADS if n != "cli_main"]  # the CLI payload would segment the demo: slow


@pytest.mark.parametrize("name", NAIVE_PROOF)
def test_payloads_work_against_a_naive_resolver(name, tmp_path, evil_module):
    marker = _marker_for(name, tmp_path, evil_module)
    try:
        _naive_build(PAYLOADS[name](marker))
    except Exception:
        pass  # some payloads fail after their side effect (e.g. a Lambda's result is not what MONAI expects)
    assert marker.exists(), f"payload {name} did nothing even naively; it proves nothing"


@pytest.mark.parametrize("name", list(PAYLOADS) + list(REFUSED_ONLY))
def test_every_payload_is_refused_in_a_recipe(name, tmp_path, evil_module):
    marker = _marker_for(name, tmp_path, evil_module)
    node = PAYLOADS[name](marker) if name in PAYLOADS else REFUSED_ONLY[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "activator_glu_cifar"}, "loss": node}))
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert "recipe.yaml" in str(info.value) and "loss" in str(info.value)
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == sorted([recipe, tmp_path / "va_evil_module.py"]) or \
        set(tmp_path.iterdir()) <= {recipe, tmp_path / "va_evil_module.py", tmp_path / "__pycache__"}


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payloads_are_refused_as_overrides_and_anywhere_in_the_tree(name, tmp_path, evil_module):
    marker = _marker_for(name, tmp_path, evil_module)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name: activator_glu_cifar}\n")
    flow = yaml.safe_dump(PAYLOADS[name](marker), default_flow_style=True).strip()
    with pytest.raises(ConfigError):
        load_config(recipe, [f"loss={flow}"])
    with pytest.raises(ConfigError):
        load_config(recipe, [f"data.augment.extra={flow}"])  # never built, but still refused
    with pytest.raises(ConfigError):
        load_config(recipe, [f"model={flow}"])
    assert not marker.exists()


def test_the_train_command_refuses_a_hostile_recipe_in_one_line(tmp_path, capsys, evil_module):
    marker = tmp_path / "marker"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "activator_glu_cifar"}, "output_dir": str(tmp_path / "run"),
                                      "loss": PAYLOADS["own_file_writer"](marker)}))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "write_text_atomic" in err
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert main(["evaluate", str(recipe), "--checkpoint", str(tmp_path / "x.safetensors")]) == 2
    assert main(["train", str(tmp_path / "ok.yaml")]) == 2  # missing file: one line too
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# run folders: `segment --model DIR`, `detect --model DIR`


def _hostile_run_folder(tmp_path, task: str, node) -> "os.PathLike":
    run = tmp_path / f"run_{task}"
    run.mkdir()
    bundled = load_run_config(__import__("visionattn.tasks.segment", fromlist=["BUNDLED"]).BUNDLED
                              / "hippocampus_agunet" / "config.yaml")
    cfg = dict(bundled, task=task)
    if task == "detection":
        cfg = {"task": "detection", "data": {"classes": ["a", "b"]}, "model": {"name": "dfir_detr"}}
    cfg["loss"] = node
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "model.safetensors").write_bytes(b"not read: the config is refused first")
    (run / "best.safetensors").write_bytes(b"not read")
    return run


@pytest.mark.parametrize("name", ["own_file_writer", "monai_apply_transform", "pathlib_through_our_module",
                                  "monai_optional_import", "cli_main"])
def test_segment_refuses_a_hostile_run_folder(name, tmp_path, capsys, evil_module):
    marker = _marker_for(name, tmp_path, evil_module)
    run = _hostile_run_folder(tmp_path, "segmentation", PAYLOADS[name](marker))
    out = tmp_path / "out"
    rc = main(["segment", "-i", str(tmp_path / "none.nii.gz"), "-o", str(out), "--model", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "config.yaml" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("name", ["own_file_writer", "monai_save_state", "timm_update_summary"])
def test_detect_refuses_a_hostile_run_folder(name, tmp_path, capsys, evil_module):
    marker = _marker_for(name, tmp_path, evil_module)
    run = _hostile_run_folder(tmp_path, "detection", PAYLOADS[name](marker))
    (tmp_path / "images").mkdir()
    rc = main(["detect", "-i", str(tmp_path / "images"), "-o", str(tmp_path / "out"), "--model", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "config.yaml" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("task: segmentation\nextra_code: {_target_: torch.nn.Identity}\n", "unknown key"),
    ("task: segmentation\nmodel: {name: agunet_3d, build: now}\n", "unknown key"),
    ("task: segmentation\ndefaults: [other.yaml]\n", "may not include"),
    ("task: exploit\n", "task must be one of"),
    ("- a list\n", "mapping"),
    ("task: segmentation\nmodel: {name: agunet_3d, kwargs: {pretrained: true}}\n", "pretrained"),
    ("task: segmentation\nmodel: {name: agunet_3d, kwargs: {pretrained_cfg_overlay: {file: x}}}\n", "pretrained_cfg_overlay"),
    ("task: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
])
def test_run_config_schema(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------
# YAML itself


def _timed_refusal(path, match, budget=2.0):  # the naive loader took over an hour on the bomb
    # CPU time of this process, not wall time: the bound is on the work done, and a worker sharing its core
    # with others in a parallel test run must not fail it
    start = time.process_time()
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert time.process_time() - start < budget
    assert str(path.name) in str(info.value)


def test_alias_bomb_is_refused_at_once(tmp_path):
    # 10 levels of 10 aliases: 10^10 entries once expanded, 600 bytes on disk
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("data:\n" + "\n".join("  " + ln for ln in lines) + "\n")
    assert path.stat().st_size < 700
    _timed_refusal(path, "expands to more than")


def test_recursive_alias_deep_nesting_and_huge_files_are_refused(tmp_path):
    (tmp_path / "rec.yaml").write_text("data: &a {x: *a}\n")
    _timed_refusal(tmp_path / "rec.yaml", "refers to itself")
    (tmp_path / "deep.yaml").write_text("data: " + "[" * 50_000 + "]" * 50_000 + "\n")
    _timed_refusal(tmp_path / "deep.yaml", "nested")
    (tmp_path / "deep2.yaml").write_text("data: " + "{a: " * 60 + "1" + "}" * 60 + "\n")
    _timed_refusal(tmp_path / "deep2.yaml", "nested more than")
    (tmp_path / "huge.yaml").write_text("data: {x: '" + "a" * (2 << 20) + "'}\n")
    _timed_refusal(tmp_path / "huge.yaml", "larger than")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    _timed_refusal(tmp_path / "binary.yaml", "not UTF-8")
    (tmp_path / "wide.yaml").write_text("data: [" + ", ".join(["1"] * 150_000) + "]\n")
    _timed_refusal(tmp_path / "wide.yaml", "more than", budget=5.0)


def test_include_chains_and_paths_are_bounded(tmp_path):
    for i in range(30):
        (tmp_path / f"c{i}.yaml").write_text(f"defaults: [c{i + 1}.yaml]\n" if i < 29 else "seed: 1\n")
    _timed_refusal(tmp_path / "c0.yaml", "nested more than")
    (tmp_path / "abs.yaml").write_text("defaults: [/etc/passwd]\n")
    _timed_refusal(tmp_path / "abs.yaml", "relative path")
    (tmp_path / "notyaml.yaml").write_text("defaults: [../../../etc/passwd]\n")
    _timed_refusal(tmp_path / "notyaml.yaml", "relative path")


def test_the_shipped_recipes_and_bundled_run_still_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    recipes = [p for p in (root / "configs").rglob("*.yaml") if not p.name.startswith("_") and "bundle" not in p.name]
    assert len(recipes) >= 8
    for recipe in recipes:
        load_config(recipe)
    load_run_config(root / "visionattn" / "bundled" / "hippocampus_agunet" / "config.yaml")


# ---------------------------------------------------------------------------------------------------
# every reachable name


DANGEROUS_FUNCTIONS = [
    "builtins.open", "builtins.eval", "builtins.exec", "builtins.compile", "builtins.__import__", "io.open",
    "os.system", "os.popen", "os.remove", "os.unlink", "os.rename", "os.replace", "os.makedirs", "os.rmdir",
    "os.execv", "os.fork", "subprocess.run", "subprocess.call", "subprocess.check_output", "subprocess.check_call",
    "socket.create_connection", "importlib.import_module", "importlib.__import__", "shutil.rmtree", "shutil.copy",
    "shutil.copyfile", "shutil.move", "pickle.load", "pickle.loads", "torch.load", "torch.save", "torch.hub.load",
    "torch.hub.load_state_dict_from_url", "torch.hub.download_url_to_file", "torch.jit.load", "torch.jit.save",
    "urllib.request.urlopen", "urllib.request.urlretrieve", "numpy.load", "numpy.save", "numpy.fromfile",
    "numpy.savez", "numpy.loadtxt", "numpy.savetxt", "pydoc.locate", "operator.attrgetter", "operator.methodcaller",
    "monai.utils.module.optional_import", "monai.utils.module.load_submodules", "monai.utils.misc.run_cmd",
    "monai.utils.misc.save_obj", "monai.networks.utils.save_state", "monai.networks.utils.convert_to_torchscript",
    "monai.networks.utils.convert_to_onnx", "monai.networks.utils.convert_to_trt",
    "monai.transforms.transform.apply_transform", "monai.apps.utils.download_url", "monai.apps.utils.extractall",
    "timm.models._factory.create_model", "timm.models._helpers.load_checkpoint", "timm.data.dataset_factory.create_dataset",
    "timm.utils.summary.update_summary", "albumentations.core.serialization.save",
    "albumentations.core.serialization.load", "visionattn.tasks.files.write_text_atomic",
    "visionattn.tasks.files.write_json_atomic", "visionattn.tasks.runtime.atomic_torch_save", "visionattn.cli.main",
    "safetensors.torch.save_file", "safetensors.torch.load_file", "yaml.load", "yaml.unsafe_load", "glob.glob",
    "tempfile.mkstemp", "tempfile.mkdtemp", "functools.partial", "webbrowser.open", "runpy.run_path", "runpy.run_module",
]
DANGEROUS_CLASSES = [
    "pathlib.PurePath", "io.IOBase", "socket.socket", "subprocess.Popen", "threading.Thread",
    "multiprocessing.process.BaseProcess", "logging.FileHandler", "zipfile.ZipFile", "tarfile.TarFile",
    "tempfile.TemporaryDirectory", "monai.transforms.utility.array.Lambda", "monai.transforms.utility.dictionary.Lambdad",
    "monai.transforms.io.array.LoadImage", "monai.transforms.io.array.SaveImage",
    "monai.transforms.io.dictionary.LoadImaged", "monai.transforms.io.dictionary.SaveImaged",
    "monai.transforms.utility.array.TorchVision", "torchvision.transforms.transforms.Lambda",
    "torchvision.transforms.v2._misc.Lambda", "albumentations.core.transforms_interface.BasicTransform.__call__",
    "torch.optim.lr_scheduler.LambdaLR", "torch.optim.lr_scheduler.MultiplicativeLR", "monai.data.Dataset",
    "torch.utils.data.Dataset", "torch.utils.tensorboard.writer.SummaryWriter", "timm.utils.CheckpointSaver",
]


def _lookup(dotted):
    try:
        return _naive_resolve(dotted)
    except Exception:
        return None


def _dangerous_objects():
    functions, classes = set(), []
    for name in DANGEROUS_FUNCTIONS:
        obj = _lookup(name)
        if obj is not None:
            functions.add(id(obj))
    for name in DANGEROUS_CLASSES:
        obj = _lookup(name)
        if isinstance(obj, type):
            classes.append(obj)
    assert len(functions) > 40 and len(classes) > 15
    return functions, tuple(classes)


def _reachable_names(max_class_attrs: int = 60):
    """Dotted public names reachable from the allowed packages: every attribute of every module met under
    them (what each module defines or merely imported), and the public attributes of the classes found."""
    roots = [importlib.import_module(p) for p in config_module.NAME_PREFIXES]
    import visionattn.cli, visionattn.tasks.detect, visionattn.tasks.segment, visionattn.tasks.trainer  # noqa: F401
    seen_modules, names = set(), []
    queue = [(m.__name__, m) for m in roots]
    for name, mod in list(sys.modules.items()):
        if mod is not None and any(name == p or name.startswith(p + ".") for p in config_module.NAME_PREFIXES):
            queue.append((name, mod))
    while queue:
        prefix, mod = queue.pop()
        if id(mod) in seen_modules:  # each module is walked once, under the first name that reached it
            continue
        seen_modules.add(id(mod))
        for attr in dir(mod):
            if attr.startswith("_"):
                continue
            try:
                value = getattr(mod, attr)
            except Exception:
                continue
            dotted = f"{prefix}.{attr}"
            if isinstance(value, types.ModuleType):
                if any(value.__name__ == p or value.__name__.startswith(p + ".") for p in config_module.NAME_PREFIXES):
                    queue.append((dotted, value))
                names.append(dotted)
                continue
            names.append(dotted)
            if isinstance(value, type):
                names += [f"{dotted}.{a}" for a in list(vars(value))[:max_class_attrs] if not a.startswith("_")]
    return sorted(set(names))


def test_no_reachable_name_that_can_execute_import_read_write_or_connect_resolves():
    functions, classes = _dangerous_objects()
    names = _reachable_names()
    assert len(names) > 20_000, len(names)

    def dangerous(obj):
        return id(obj) in functions or (isinstance(obj, type) and issubclass(obj, classes)) or \
            isinstance(obj, types.ModuleType)

    # the walk must be able to fail: a naive resolver reaches dangerous objects through these very names
    naive_hits = [n for n in names[::7] if dangerous(_lookup(n))]
    assert len(naive_hits) > 20, naive_hits[:5]

    resolved, bad = 0, []
    for name in names:
        try:
            obj = resolve_target(name)
        except ConfigError:
            continue
        resolved += 1
        if dangerous(obj):
            bad.append(name)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            assert (obj.__module__, obj.__name__) in config_module.ALLOWED_FUNCTIONS, name
    assert not bad, bad[:20]
    assert resolved > 1000  # the allowed classes (modules, losses, transforms ...) still resolve


def test_allowed_kinds_still_build():
    from visionattn.tasks.config import instantiate

    for node in [
        {"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.1},
        {"_target_": "monai.losses.DiceCELoss", "to_onehot_y": True, "softmax": True},
        {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
         "channels": [8, 16], "strides": [2]},
        {"_target_": "monai.networks.nets.EfficientNetBN", "model_name": "efficientnet-b0", "pretrained": False,
         "spatial_dims": 2, "num_classes": 2},
        {"_target_": "monai.transforms.Compose", "transforms": [{"_target_": "monai.transforms.RandFlipd",
                                                                 "keys": ["image"], "prob": 0.5}]},
        {"_target_": "monai.inferers.SlidingWindowInferer", "roi_size": [32, 32]},
        {"_target_": "albumentations.Compose", "transforms": [{"_target_": "albumentations.HorizontalFlip"}]},
        {"_target_": "torchvision.transforms.Compose", "transforms": [{"_target_": "torchvision.transforms.ToTensor"}]},
        {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"},
        {"_target_": "timm.layers.Mlp", "in_features": 4},
        {"_target_": "visionattn.create_model", "name": "activator_glu_cifar", "num_classes": 3},
        {"_target_": "visionattn.decoders.MutationLoss"},
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    ]:
        instantiate(node)
    validate({"_target_": "monai.metrics.DiceMetric"})
    validate({"_target_": "timm.scheduler.CosineLRScheduler", "t_initial": 10})


def test_a_recipe_cannot_make_train_write_over_files(tmp_path, capsys):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "metrics.csv").write_text("my own numbers\n")
    (precious / "config.yaml").write_text("mine: true\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "activator_glu_cifar"}, "output_dir": str(precious),
                                      "data": {"root": str(tmp_path / "nowhere")}}))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--overwrite" in err and "Traceback" not in err
    assert (precious / "metrics.csv").read_text() == "my own numbers\n"
    assert (precious / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in precious.iterdir()) == ["config.yaml", "metrics.csv"]
    # asked for: the data problem is reached (nothing written before it either)
    assert main(["train", str(recipe), "--overwrite"]) == 2
    assert "not found" in capsys.readouterr().err
    assert (precious / "metrics.csv").read_text() == "my own numbers\n"
