"""SimCLR on STL-10: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 64-px views (crops of the
96-px images resampled to 64 px, test images resized to 64, as W-MSE); global batch 256, 2000
epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.4 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
SimCLR: proj_hidden_dim=2048, proj_output_dim=256, temperature=0.2 (others: the module's defaults).
Source: solo-learn's scripts/pretrain/cifar/simclr.yaml (solo-learn publishes no STL-10 recipe);
epochs, input size and split follow W-MSE's code (htdt/self-supervised README and datasets/), whose
table has the linear / 5-NN columns on the four data sets of the UMM paper's Table 1.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build stl10 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run. Pre-training reads
train+unlabelled (105,000 images, W-MSE's protocol; `train.split`).

Run:
  python -m umm_jax.main --config=configs/simclr_stl10.py --workdir=runs/simclr_stl10

Expect: the UMM paper's Table 1 reports 90.51 linear / 85.68 5-NN top-1 for SimCLR on STL-10
(ResNet-18, mean of five runs; 91.79 / 86.99 after UMM). This config's stages log the online linear
probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json),
the offline k-NN and linear protocols (evaluation.json) and report.md.

Notes: umm_jax.augment gives views above 32 px the ImageNet settings (crops from 8% of the area,
Gaussian blur); W-MSE's 64-px crops start at 20% and skip the blur, and its ResNet-18 keeps the
max-pool that the CIFAR stem drops.
"""

from configs import recipes


def get_config():
  return recipes.config("simclr", "stl10")
