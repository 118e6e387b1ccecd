"""``train.ema_decay``: the weight average the trainer evaluates and saves must track the trained model,
BatchNorm statistics included, on a run far shorter than ``1 / (1 - ema_decay)`` steps.

Without a warmup, an average with decay 0.999 keeps ``0.999 ** steps`` of the initial weights: a BatchNorm
``running_var`` starts at 1.0, so wherever the true variance is far from 1 the averaged network normalises
with the wrong scale (a DRIVE EMCAD run evaluated with such an average predicted no vessel at all after
2,000 steps). The run here trains a small 2-D attention U-Net (BatchNorm) on raw 0-255 intensities, where
BatchNorm variances reach about a thousand, and compares the average with the model it averages;
``train.ema_warmup: false`` (the old behaviour) is run too, to show that the check catches the failure."""
import numpy as np
import pytest
from PIL import Image

from visionattn.tasks.config import load_config
from visionattn.tasks.trainer import Trainer

RECIPE = """
task: segmentation
seed: 0
output_dir: {out}
data:
  kind: image_mask
  images: {images}
  masks: {masks}
  val_fraction: 0.25
  spatial_dims: 2
  in_channels: 1
  labels: [background, disk]
  label_values: [0, 255]
  intensity: none
  roi_size: [32, 32]
  augment: {{foreground_crop: false, intensity: 0}}
model:
  name: agunet_2d
  kwargs: {{filters: [4, 8]}}
loss:
  _target_: monai.losses.DiceCELoss
  to_onehot_y: true
  softmax: true
train:
  epochs: 30
  batch_size: 3
  lr: 0.01
  warmup_epochs: 0
  ema_decay: 0.999
  eval_every: 1000
  log_every: 1000
  threads: 1
"""


def disks(folder) -> tuple:
    """Eight 32x32 grayscale images (0-255) of a bright disk on a noisy background, and their masks."""
    rng = np.random.default_rng(0)
    images, masks = folder / "images", folder / "masks"
    images.mkdir()
    masks.mkdir()
    yy, xx = np.mgrid[:32, :32]
    for i in range(8):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 9)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        pixels = np.clip(rng.normal(60, 20, (32, 32)) + 140 * disk, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i:02d}.png")
        Image.fromarray((disk * 255).astype(np.uint8)).save(masks / f"{i:02d}.png")
    return images, masks


def bn_variance_mismatch(trainer: Trainer) -> float:
    """The largest relative gap between the average's BatchNorm running variances and the model's."""
    live = dict(trainer.model.named_buffers())
    gaps = [((avg - live[name]).norm() / live[name].norm()).item()
            for name, avg in trainer.ema.module.named_buffers() if name.endswith("running_var")]
    assert gaps, "the model has no BatchNorm layer: the test would check nothing"
    return max(gaps)


@pytest.mark.parametrize("warmup", [True, False], ids=["default warmup", "no warmup (the old behaviour)"])
def test_ema_tracks_batchnorm_statistics_on_a_short_run(tmp_path, warmup):
    images, masks = disks(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "run", images=images, masks=masks))
    overrides = [] if warmup else ["train.ema_warmup=false"]
    trainer = Trainer(load_config(str(recipe), overrides), config_path=str(recipe))
    trainer.fit()
    assert trainer.step == 60  # 6 training images in batches of 3, 30 epochs
    mismatch = bn_variance_mismatch(trainer)
    if warmup:
        assert mismatch < 0.5, mismatch
    else:
        assert mismatch > 0.8, mismatch  # 0.999 ** 60 = 94% of the initial 1.0 left in the average
