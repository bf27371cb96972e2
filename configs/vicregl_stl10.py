"""VICRegL on STL-10: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 64-px views (crops of the
96-px images resampled to 64 px, test images resized to 64, as W-MSE); global batch 256, 2000
epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
VICRegL has no published recipe at this scale: the optimiser settings are VICReg's (solo-learn's
scripts/pretrain/cifar/vicreg.yaml; unverified for VICRegL), the heads its module's defaults.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build stl10 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run. Pre-training reads
train+unlabelled (105,000 images, W-MSE's protocol; `train.split`).

Run:
  python -m umm_jax.main --config=configs/vicregl_stl10.py --workdir=runs/vicregl_stl10

Expect: the UMM paper's Table 1 reports 92.12 linear / 90.01 5-NN top-1 for VICRegL on STL-10
(ResNet-18, mean of five runs; 92.48 / 91.17 after UMM). This config's stages log the online linear
probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json),
the offline k-NN and linear protocols (evaluation.json) and report.md.

Notes: umm_jax.augment gives views above 32 px the ImageNet settings (crops from 8% of the area,
Gaussian blur); W-MSE's 64-px crops start at 20% and skip the blur, and its ResNet-18 keeps the
max-pool that the CIFAR stem drops.
"""

from configs import recipes


def get_config():
  return recipes.config("vicregl", "stl10")
