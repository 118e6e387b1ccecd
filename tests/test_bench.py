"""The benchmark commands run and print their comparison tables (no timing assertions: targets are
checked by reading the benchmark, not by unit tests)."""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from visionattn.cli import main
from visionattn.tasks.runtime import KEEP_MEMORY_TUNABLES


def test_bench_models_compare_timm(capsys, tmp_path):
    out_json = tmp_path / "b.json"
    rc = main(["bench", "models", "convit_tiny", "--compare", "timm", "--img-size", "64", "--batch-size", "2",
               "--min-time", "0.2", "--json", str(out_json)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "speedup" in table and "timm_img_s" in table and "convit_tiny" in table
    # the row as it was measured, then a blank line and the table
    lines = table.splitlines()
    assert lines[0].startswith("convit_tiny: batch 2") and "speedup" in lines[0] and lines[1] == ""
    assert lines[2].split()[:2] == ["model", "batch"]
    (row,) = json.loads(out_json.read_text())
    assert row["ours_img_s"] > 0 and row["timm_img_s"] > 0
    assert row["max_abs_diff"] <= 1e-5  # same weights, same outputs


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
def test_machine_record_names_the_memory_allocator_and_its_thresholds():
    """Whether a freed large block goes back to the system (and the next one page-faults in afresh) can
    change a timing several times over, so a benchmark row records the allocator and its thresholds."""
    code = "from visionattn.tasks.runtime import machine_info; print(machine_info()['allocator'])"
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")}

    def allocator(**extra):
        run = subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert allocator().endswith(" malloc (default thresholds)")
    assert allocator(GLIBC_TUNABLES=KEEP_MEMORY_TUNABLES).endswith(" malloc (mmap_threshold=268435456, trim_threshold=1073741824)")
    assert allocator(MALLOC_TRIM_THRESHOLD_="65536").endswith(" malloc (trim_threshold=65536)")


def test_bench_models_needs_a_name(capsys):
    assert main(["bench", "models"]) == 2
    assert "name at least one model" in capsys.readouterr().err


def test_bench_kernels_small_problem(capsys, tmp_path):
    """Runs every alternative once on a small problem; the outputs must agree (compiled flex_attention with
    a block mask is an independent implementation of the same neighborhood)."""
    out_json = tmp_path / "k.json"
    rc = main(["bench", "kernels", "--problems", "2d-16-k5", "--min-time", "0.05", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "matmul ceiling" in text and "fwd ratio" in text and "bwd ratio" in text
    # each implementation's row as it was measured, before the final table
    for impl in ("visionattn-torch", "naive-gather", "masked-dense-sdpa"):
        assert text.index(f"2d-16-k5 {impl}: fwd") < text.index("impl "), text
    rows = {r["impl"]: r for r in json.loads(out_json.read_text())}
    assert set(rows) == {"visionattn-torch", "naive-gather", "masked-dense-sdpa", "flex-attention-compiled",
                         "flex-attention-tiled"}
    for r in rows.values():
        assert r["max_abs_diff"] < 1e-4, r
        assert r["fwd_ms"] > 0 and r["matmul_ceiling_gflops"] > 0
        # where it was measured: the CPU, the instruction set torch dispatches to, the threads it ran on
        machine = r["machine"]
        assert machine["cpu"] and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert machine["torch_threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__
        assert "malloc" in machine["allocator"] or machine["allocator"] in ("jemalloc", "tcmalloc", "mimalloc")
    assert rows["naive-gather"]["fwdbwd_ms"] > 0 and rows["naive-gather"]["bwd_ms"] is not None
    assert rows["visionattn-torch"]["fwd_ratio"] == 1.0 and rows["visionattn-torch"]["bwd_over_fwd"] is not None
    # our backward is timed alone (a kept graph), the alternatives' as (fwd+bwd) - fwd
    ours = rows["visionattn-torch"]
    assert ours["bwd_timing"] == "alone" and ours["bwd_ms"] > 0  # (separate minima: under load the order may flip)
    assert abs(ours["bwd_over_fwd"] - ours["bwd_ms"] / ours["fwd_ms"]) < 1e-9
    assert rows["naive-gather"]["bwd_timing"] == "difference"
    for flex in ("flex-attention-compiled", "flex-attention-tiled"):
        assert rows[flex]["fwdbwd_ms"] is None
    assert "block mask (tiled token order)" in text


def test_bench_kernels_linear_and_topk_problems(capsys, tmp_path):
    out_json = tmp_path / "o.json"
    rc = main(["bench", "kernels", "--problems", "linear-256,topk-64", "--min-time", "0.05", "--json", str(out_json)])
    assert rc == 0
    rows = {(r["problem"], r["impl"]): r for r in json.loads(out_json.read_text())}
    assert set(rows) == {("linear-256", "visionattn-torch"), ("linear-256", "one-contraction"),
                         ("linear-256", "chunked-1024"), ("topk-64", "visionattn-torch"),
                         ("topk-64", "dense-masked-reference")}
    for r in rows.values():
        assert r["max_abs_diff"] < 1e-4, r
        assert r["fwdbwd_ms"] > 0 and r["bwd_ratio"] is not None


def test_bench_kernels_rejects_unknown_problem(capsys):
    assert main(["bench", "kernels", "--problems", "2d-99", "--skip", "naive,dense,flex"]) == 2
    assert "unknown problem" in capsys.readouterr().err


def test_bench_models_biformer_against_full_gather(capsys, tmp_path):
    out_json = tmp_path / "g.json"
    rc = main(["bench", "models", "biformer_tiny", "--compare", "gather", "--img-size", "64", "--batch-size", "1",
               "--min-time", "0.1", "--json", str(out_json)])
    assert rc == 0
    (row,) = json.loads(out_json.read_text())
    assert row["max_abs_diff"] < 1e-4 and row["gather_img_s"] > 0
    for key in ("infer_peak_mib", "gather_infer_peak_mib", "train_peak_mib", "gather_train_peak_mib"):
        assert row[key] >= 0


def test_bench_models_reports_each_model_before_measuring_the_next(monkeypatch):
    """``report`` gets a model's row as soon as it is measured (a tiny model, a few hundredths of a second)."""
    import visionattn.tasks.bench as bench

    measured = []
    interleaved_times = bench.interleaved_times
    monkeypatch.setattr(bench, "interleaved_times", lambda *a, **k: (measured.append(1), interleaved_times(*a, **k))[1])
    reported = []
    table, rows = bench.bench_models(["activator_glu_cifar", "activator_glu_cifar"], batch_size=1, min_time=0.01,
                                     report=lambda line: reported.append((len(measured), line)))
    assert [n for n, _ in reported] == [1, 2]
    assert all(line.startswith("activator_glu_cifar: batch 1") and "ours_img_s" in line for _, line in reported)
    assert len(rows) == 2 and "ours_img_s" in table


TINY_RECIPE = """
seed: 0
output_dir: {out}
model:
  name: ninformer_cifar
  kwargs: {{img_size: 16, patch_size: 4, embed_dim: 32, mlp_dim: 64, depth: 2}}
data:
  kind: image_folder
  root: {data}
  val_per_class: 2
  img_size: 16
train:
  epochs: 2
  batch_size: 4
  lr: 0.003
  ema_decay: 0.9
  clip_grad: 1.0
"""


def test_bench_train_times_the_trainer_beside_a_bare_loop(capsys, tmp_path, monkeypatch, make_image_folder):
    """Both sides really train (the trainer's step counter and the weights move), the table has the ratio,
    and the recipe's output_dir is never touched (the bench trains in a temporary folder)."""
    import torch

    from visionattn.tasks import bench_train as bt

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.format(out=tmp_path / "must_not_exist", data=make_image_folder(8, noise=0.0)))

    seen = {}
    real_measure = bt._measure

    def spy(trainer, *args):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        row = real_measure(trainer, *args)
        seen["steps"] = trainer.step
        seen["moved"] = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
        return row

    monkeypatch.setattr(bt, "_measure", spy)
    json_path = tmp_path / "rows.json"
    assert main(["bench", "train", str(recipe), "--steps", "2", "--threads", "1", "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "round 1/3: trainer" in out and "trainer / bare" in out and "overhead" in out
    assert seen["steps"] == 1 + 3 * 2 and seen["moved"]  # warm-up + rounds x steps through the trainer
    (row,) = json.loads(json_path.read_text())
    assert row["model"] == "ninformer_cifar" and row["batch_size"] == 4
    assert row["trainer_ms"] > 0 and row["bare_ms"] > 0
    assert abs(row["overhead"] - (row["trainer_ms"] / row["bare_ms"] - 1)) < 1e-9
    assert not (tmp_path / "must_not_exist").exists()


def test_bench_models_compare_peer(capsys, tmp_path):
    """Gated-SwinRMT beside its timm peer (Swin-T): images/s and per-GMAC ratios, inference and training."""
    out_json = tmp_path / "p.json"
    rc = main(["bench", "models", "gated_swinrmt_retention_tiny", "--compare", "peer", "--img-size", "64",
               "--batch-size", "1", "--min-time", "0.05", "--threads", "1", "--json", str(out_json)])
    assert rc == 0
    assert "infer_per_gmac_ratio" in capsys.readouterr().out
    (row,) = json.loads(out_json.read_text())
    assert row["peer"] == "swin_tiny_patch4_window7_224" and 0 < row["gmacs"] < row["peer_gmacs"]
    for tag in ("infer", "train"):
        assert row[f"{tag}_img_s"] > 0 and row[f"{tag}_peer_img_s"] > 0
        ratio = row[f"{tag}_img_s"] / row[f"{tag}_peer_img_s"]
        assert abs(row[f"{tag}_per_gmac_ratio"] - ratio * row["gmacs"] / row["peer_gmacs"]) < 1e-6 * ratio
    assert abs(row["infer_gflop_s"] - 2 * row["infer_img_s"] * row["gmacs"]) < 1e-6 * row["infer_gflop_s"]


def test_bench_models_compare_peer_needs_a_peer():
    import pytest

    with pytest.raises(ValueError, match="no timm peer"):
        main(["bench", "models", "ninformer_cifar", "--compare", "peer", "--img-size", "32", "--batch-size", "1"])


def test_every_224_classifier_has_a_timm_peer():
    import timm

    import visionattn
    from visionattn.registry import get_entry
    from visionattn.tasks.bench import PEERS

    full_size = [n for n in visionattn.list_models(task="classification") if get_entry(n).default_input_size[1:] == (224, 224)]
    assert len(full_size) >= 15
    assert sorted(set(full_size) - set(PEERS)) == []
    assert all(timm.is_model(peer) for peer in PEERS.values())


def test_bench_segmentation_network_beside_its_monai_peer(tmp_path):
    """A 2-D attention-gated U-Net beside MONAI's AttentionUnet: images/s, per-GMAC ratios and GFLOP/s."""
    out_json = tmp_path / "s.json"
    rc = main(["bench", "models", "agunet_2d", "--compare", "peer", "--img-size", "32", "--batch-size", "1",
               "--min-time", "0.02", "--threads", "1", "--json", str(out_json)])
    assert rc == 0
    (row,) = json.loads(out_json.read_text())
    assert row["peer"].startswith("monai.AttentionUnet") and row["input"] == "32x32"
    assert row["gmacs"] > 0 and row["peer_gmacs"] > 0
    for tag in ("infer", "train"):
        ratio = row[f"{tag}_img_s"] / row[f"{tag}_peer_img_s"]
        assert abs(row[f"{tag}_per_gmac_ratio"] - ratio * row["gmacs"] / row["peer_gmacs"]) < 1e-6 * ratio


def test_every_segmentation_network_has_a_monai_peer_and_needs_compare_peer():
    import pytest

    import visionattn
    from visionattn.tasks.bench import SEGMENTATION_PEERS

    assert sorted(visionattn.list_models(task="segmentation")) == sorted(SEGMENTATION_PEERS)
    with pytest.raises(ValueError, match="--compare peer"):
        main(["bench", "models", "agunet_2d", "--img-size", "32", "--batch-size", "1"])


def test_bench_json_is_not_overwritten_without_asking(capsys, tmp_path, monkeypatch):
    """An existing --json file is refused before any timing and kept byte for byte; --overwrite replaces it
    by a rename (no partial file if the write fails); a missing folder is named."""
    import visionattn.tasks.bench as bench

    earlier = tmp_path / "k.json"
    earlier.write_text('[{"earlier": "measurement"}]')
    timed = []
    monkeypatch.setattr(bench, "bench_kernels", lambda **kw: timed.append(kw) or ("table", [{"impl": "x"}]))
    assert main(["bench", "kernels", "--json", str(earlier)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err, err
    assert timed == [] and earlier.read_text() == '[{"earlier": "measurement"}]'

    assert main(["bench", "kernels", "--json", str(tmp_path / "no" / "k.json")]) == 2
    assert "does not exist" in capsys.readouterr().err and timed == []

    assert main(["bench", "kernels", "--json", str(earlier), "--overwrite"]) == 0
    (row,) = json.loads(earlier.read_text())
    assert row["impl"] == "x" and "machine" in row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]  # no temporary left beside it


def test_bench_models_breakdown_by_kind_of_operator(capsys, tmp_path):
    """``--breakdown``: per kind of operator, each model's share of inference time, multiply-adds and GFLOP/s.
    The shares sum to 1 and the categories' multiply-adds per image to the model's count; Swin-T's multiply-adds are nearly
    all in linear layers, while a real part of Gated-SwinRMT's are in its depthwise convolutions (a categorisation
    that put every counted op in one bin, or missed the convolutions, would fail here)."""
    out_json = tmp_path / "b.json"
    rc = main(["bench", "models", "gated_swinrmt_swat_tiny", "--compare", "peer", "--img-size", "64",
               "--batch-size", "2", "--min-time", "0.05", "--threads", "1", "--breakdown", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Where inference time goes" in out and "'category'" not in out  # the per-model line leaves the list out
    (row,) = json.loads(out_json.read_text())
    parts = {r["category"]: r for r in row["breakdown"]}
    assert list(parts) == ["linear", "convolution", "attention products", "other"]
    for side, total in (("ours", row["gmacs"]), ("peer", row["peer_gmacs"])):
        assert abs(sum(r[f"{side}_time_share"] for r in parts.values()) - 1) < 1e-9
        assert abs(sum(r[f"{side}_gmacs"] for r in parts.values()) - total) < 1e-6 * total
        assert parts["other"][f"{side}_gmacs"] == 0 and parts["linear"][f"{side}_gflop_s"] > 0
    assert parts["linear"]["peer_gmacs"] > 0.9 * row["peer_gmacs"]
    assert parts["convolution"]["ours_gmacs"] > 0.1 * row["gmacs"]
    assert parts["attention products"]["ours_gmacs"] > 0 and parts["attention products"]["peer_gmacs"] > 0
    # the bounds, recomputed from the table's own columns: a side's total time is its linear layers' time over
    # their share, and their time is 2 x GMACs x batch over their GFLOP/s
    batch, lin = row["batch"], parts["linear"]
    total = {side: 2 * lin[f"{side}_gmacs"] * batch / lin[f"{side}_gflop_s"] / lin[f"{side}_time_share"]
             for side in ("ours", "peer")}
    peer_rate = row["peer_gmacs"] * batch / total["peer"]
    measured = row["gmacs"] * batch / total["ours"] / peer_rate
    bounds = row["per_gmac_bounds"]
    assert abs(bounds["measured"] - measured) < 1e-6 * measured
    assert abs(bounds["rest_free"] - measured / (1 - parts["other"]["ours_time_share"])) < 1e-6 * measured
    assert abs(bounds["all_at_linear_rate"] - lin["ours_gflop_s"] / 2 / peer_rate) < 1e-6 * measured
    assert bounds["measured"] < bounds["rest_free"]
    assert (f"gated_swinrmt_swat_tiny: per-GMAC ratio against {row['peer']} in the profile "
            f"{bounds['measured']:.2f}; if every operator without multiply-adds took no time {bounds['rest_free']:.2f}") in out


def test_bench_breakdown_categories_and_its_flag():
    import pytest

    from visionattn.tasks.bench import _op_category

    for name, category in [("aten::addmm", "linear"), ("aten.mm.default", "linear"), ("aten::mkldnn_convolution", "convolution"),
                           ("aten::_slow_conv2d_forward", "convolution"), ("aten.convolution", "convolution"),
                           ("aten::bmm", "attention products"),
                           ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention products"),
                           ("aten::add", "other"), ("aten::native_group_norm", "other"), ("aten::copy_", "other")]:
        assert _op_category(name) == category, name
    assert _op_category("visionattn.na_forward.default", counted=True) == "attention products"
    assert _op_category("visionattn::na_forward") == "attention products"  # the profiler's event: its own loops
    with pytest.raises(ValueError, match="--compare peer"):
        main(["bench", "models", "gated_swinrmt_swat_tiny", "--breakdown", "--img-size", "64"])


def test_per_gmac_bounds_of_a_network_without_linear_layers():
    """The bounds from two breakdowns, by hand: ours does 2 GMACs in 1 s of convolutions + 1 s of other
    operators, the peer 4 GMACs in 2 s: per GMAC 0.5 as measured, 1.0 with the other operators free, and no
    linear-layer rate to scale to (a U-Net has none): said, not divided by zero."""
    from visionattn.tasks.bench import format_bounds, per_gmac_bounds

    def breakdown(**parts):
        out = {c: {"seconds": 0.0, "gmacs": 0.0} for c in ("linear", "convolution", "attention products", "other")}
        for c, (secs, gmacs) in parts.items():
            out[c.replace("_", " ")] = {"seconds": secs, "gmacs": gmacs}
        return out

    ours = breakdown(convolution=(1.0, 2.0), other=(1.0, 0.0))
    peer = breakdown(linear=(1.5, 3.0), convolution=(0.5, 1.0))
    bounds = per_gmac_bounds(ours, peer)
    assert bounds == {"measured": 0.5, "rest_free": 1.0, "all_at_linear_rate": None}
    line = format_bounds({"model": "unet", "peer": "monai", "per_gmac_bounds": bounds})
    assert line.endswith("if every operator without multiply-adds took no time 1.00 (it has no linear layers)")
    ours["linear"] = {"seconds": 0.5, "gmacs": 2.0}  # 4 GMACs/s against the peer's 2
    assert per_gmac_bounds(ours, peer)["all_at_linear_rate"] == 2.0
