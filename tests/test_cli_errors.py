"""The command line tells a user's mistake (one line, exit 2) from a bug (the traceback stays)."""
import pytest

import visionattn.cli as cli
from visionattn.errors import ModelArgumentError, UnknownModelError, UserError


def test_user_errors_are_one_line(capsys, tmp_path):
    assert cli.main(["info", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unknown visionattn model 'no_such_model'" in err and "Traceback" not in err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: activator_glu_cifar, kwargs: {no_such_argument: 1}}\n"
                      f"output_dir: {tmp_path / 'run'}\ndata: {{kind: npz, path: {tmp_path / 'none.npz'}}}\n")
    assert cli.main(["evaluate", str(recipe)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert cli.main(["evaluate", str(recipe), "--checkpoint", str(weights), "--per-case"]) == 2
    err = capsys.readouterr().err
    assert "--per-case reports segmentation recipes'" in err and "'classification'" in err


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(args):
        return {}["a bug, not a user error"]

    monkeypatch.setattr(cli, "_cmd_info", broken)  # build_parser looks the handler up when main runs
    with pytest.raises(KeyError):
        cli.main(["info", "convit_tiny"])


def test_error_types_are_both_user_errors_and_the_builtin_kind():
    import visionattn

    with pytest.raises(UnknownModelError) as info:
        visionattn.create_model("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, UserError)
    assert str(info.value).startswith("Unknown visionattn model")  # not quoted as KeyError would
    with pytest.raises(ModelArgumentError) as info:
        visionattn.create_model("activator_glu_cifar", bogus=1)
    assert isinstance(info.value, TypeError)
