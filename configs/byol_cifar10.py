"""BYOL on CIFAR-10: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 1.0 x batch/256, weight decay 1e-5; 10 warm-up epochs from 3e-5, then cosine to 0.
BYOL: proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096 (others: the module's
defaults). Source: solo-learn's scripts/pretrain/cifar/byol.yaml.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar10 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/byol_cifar10.py --workdir=runs/byol_cifar10

Expect: solo-learn's README results table reports 92.58 Acc@1 for BYOL on CIFAR-10 (ResNet-18, 1000
epochs, this recipe). The UMM paper's Table 1 reports 91.93 linear / 89.45 5-NN top-1 for BYOL on
CIFAR-10 (ResNet-18, mean of five runs; 92.99 / 90.81 after UMM). This config's stages log the
online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint
(monitor.json), the offline k-NN and linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("byol", "cifar10")
