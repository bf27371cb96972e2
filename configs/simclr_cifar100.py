"""SimCLR on CIFAR-100: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.4 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
SimCLR: proj_hidden_dim=2048, proj_output_dim=256, temperature=0.2 (others: the module's defaults).
Source: solo-learn's scripts/pretrain/cifar/simclr.yaml.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar100 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/simclr_cifar100.py --workdir=runs/simclr_cifar100

Expect: solo-learn's README results table reports 65.78 Acc@1 for SimCLR on CIFAR-100 (ResNet-18,
1000 epochs, this recipe). The UMM paper's Table 1 reports 66.83 linear / 56.56 5-NN top-1 for
SimCLR on CIFAR-100 (ResNet-18, mean of five runs; 67.95 / 57.25 after UMM). This config's stages
log the online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor of every
checkpoint (monitor.json), the offline k-NN and linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("simclr", "cifar100")
