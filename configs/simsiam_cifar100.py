"""SimSiam on CIFAR-100: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): SGD (momentum 0.9), lr 0.5 x batch/256, weight decay
1e-5 on every parameter; 10 warm-up epochs from 3e-5, then cosine to 0. SimSiam:
proj_hidden_dim=2048, proj_output_dim=2048, pred_hidden_dim=512 (others: the module's defaults).
Source: solo-learn's scripts/pretrain/cifar/simsiam.yaml.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar100 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/simsiam_cifar100.py --workdir=runs/simsiam_cifar100

Expect: solo-learn's README results table reports 66.04 Acc@1 for Simsiam on CIFAR-100 (ResNet-18,
1000 epochs, this recipe). The UMM paper's Table 1 reports 67.02 linear / 56.36 5-NN top-1 for
SimSiam on CIFAR-100 (ResNet-18, mean of five runs; 68.31 / 57.69 after UMM). This config's stages
log the online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor of every
checkpoint (monitor.json), the offline k-NN and linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("simsiam", "cifar100")
