r"""SimSiam on Tiny-ImageNet: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 64-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): SGD (momentum 0.9), lr 0.5 x batch/256, weight decay
1e-5 on every parameter; 10 warm-up epochs from 3e-5, then cosine to 0. SimSiam:
proj_hidden_dim=2048, proj_output_dim=2048, pred_hidden_dim=512 (others: the module's defaults).
Source: solo-learn's scripts/pretrain/cifar/simsiam.yaml (solo-learn publishes no Tiny-ImageNet
recipe); epochs, input size and split follow W-MSE's code (htdt/self-supervised README and
datasets/), whose table has the linear / 5-NN columns on the four data sets of the UMM paper's Table
1.

Data: download and unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip; the run reads it from
`--config.data.data_dir` (its tiny-imagenet-200 folder).

Run:
  python -m umm_jax.main --config=configs/simsiam_tiny_imagenet.py \
    --workdir=runs/simsiam_tiny_imagenet \
    --config.data.data_dir=<dir>/tiny-imagenet-200

Expect: the UMM paper's Table 1 reports 51.14 linear / 35.67 5-NN top-1 for SimSiam on Tiny-ImageNet
(ResNet-18, mean of five runs; 52.42 / 37.12 after UMM). This config's stages log the online linear
probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json),
the offline k-NN and linear protocols (evaluation.json) and report.md.

Notes: umm_jax.augment gives views above 32 px the ImageNet settings (crops from 8% of the area,
Gaussian blur); W-MSE's 64-px crops start at 20% and skip the blur, and its ResNet-18 keeps the
max-pool that the CIFAR stem drops.
"""

from configs import recipes


def get_config():
  return recipes.config("simsiam", "tiny_imagenet")
