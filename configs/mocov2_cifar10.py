"""MoCo v2 on CIFAR-10: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): SGD (momentum 0.9), lr 0.3 x batch/256, weight decay
1e-4 on every parameter; 10 warm-up epochs from 3e-5, then cosine to 0. MoCo v2:
proj_hidden_dim=2048, proj_output_dim=256, queue_size=32768, temperature=0.2 (others: the module's
defaults). Source: solo-learn's scripts/pretrain/cifar/mocov2plus.yaml.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar10 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/mocov2_cifar10.py --workdir=runs/mocov2_cifar10

Expect: solo-learn's README results table reports 92.94 Acc@1 for MoCo V2+ on CIFAR-10 (ResNet-18,
1000 epochs, this recipe). The UMM paper's Table 1 reports 91.69 linear / 88.66 5-NN top-1 for MoCo
on CIFAR-10 (ResNet-18, mean of five runs). The paper does not say which MoCo; v2 is assumed. This
config's stages log the online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor
of every checkpoint (monitor.json), the offline k-NN and linear protocols (evaluation.json) and
report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("mocov2", "cifar10")
