r"""Barlow Twins on Tiny-ImageNet: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 64-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
Barlow Twins: proj_hidden_dim=2048, proj_output_dim=2048, scale_loss=0.1 (others: the module's
defaults). Source: solo-learn's scripts/pretrain/cifar/barlow.yaml (solo-learn publishes no
Tiny-ImageNet recipe); epochs, input size and split follow W-MSE's code (htdt/self-supervised README
and datasets/), whose table has the linear / 5-NN columns on the four data sets of the UMM paper's
Table 1.

Data: download and unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip; the run reads it from
`--config.data.data_dir` (its tiny-imagenet-200 folder).

Run:
  python -m umm_jax.main --config=configs/barlow_twins_tiny_imagenet.py \
    --workdir=runs/barlow_twins_tiny_imagenet \
    --config.data.data_dir=<dir>/tiny-imagenet-200

Expect: the UMM paper's Table 1 reports 49.78 linear / 34.18 5-NN top-1 for Barlow Twins on
Tiny-ImageNet (ResNet-18, mean of five runs; 50.82 / 35.44 after UMM). This config's stages log the
online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint
(monitor.json), the offline k-NN and linear protocols (evaluation.json) and report.md.

Notes: umm_jax.augment gives views above 32 px the ImageNet settings (crops from 8% of the area,
Gaussian blur); W-MSE's 64-px crops start at 20% and skip the blur, and its ResNet-18 keeps the
max-pool that the CIFAR stem drops.
"""

from configs import recipes


def get_config():
  return recipes.config("barlow_twins", "tiny_imagenet")
