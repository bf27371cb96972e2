"""W-MSE on CIFAR-100: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): Adam, lr 2e-3 x batch/256, L2 weight decay 1e-6 on
every parameter; 10 warm-up epochs from 0, then cosine to 0. W-MSE: proj_hidden_dim=1024,
proj_output_dim=64, w_size=128 (others: the module's defaults). Source: solo-learn's
scripts/pretrain/cifar/wmse.yaml.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar100 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/wmse_cifar100.py --workdir=runs/wmse_cifar100

Expect: solo-learn's README results table reports 61.33 Acc@1 for W-MSE on CIFAR-100 (ResNet-18,
1000 epochs, this recipe). The UMM paper's Table 1 reports 67.64 linear / 56.45 5-NN top-1 for W-MSE
on CIFAR-100 (ResNet-18, mean of five runs; 68.62 / 57.41 after UMM). W-MSE's README trains its
table with 2 or 4 views per image (W-MSE 2, W-MSE 4); the paper does not say which it reports, and
this module has two. This config's stages log the online linear probe's test accuracy
(metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json), the offline k-NN and
linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("wmse", "cifar100")
