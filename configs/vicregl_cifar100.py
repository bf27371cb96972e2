"""VICRegL on CIFAR-100: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
VICRegL has no published recipe at this scale: the optimiser settings are VICReg's (solo-learn's
scripts/pretrain/cifar/vicreg.yaml; unverified for VICRegL), the heads its module's defaults.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar100 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/vicregl_cifar100.py --workdir=runs/vicregl_cifar100

Expect: the UMM paper's Table 1 reports 68.03 linear / 57.34 5-NN top-1 for VICRegL on CIFAR-100
(ResNet-18, mean of five runs; 69.21 / 58.42 after UMM). This config's stages log the online linear
probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json),
the offline k-NN and linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("vicregl", "cifar100")
