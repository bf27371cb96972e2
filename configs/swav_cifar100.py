"""SwAV on CIFAR-100: pre-training and the layer-wise monitor.

ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool) on 32-px views; global batch
256, 1000 epochs; checkpoints every 5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["cifar"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.6 x batch/256, weight decay 1e-6; 10 warm-up epochs from 3e-5, then cosine to 0.
SwAV: proj_hidden_dim=2048, proj_output_dim=128, num_prototypes=3000, queue_size=3840,
temperature=0.1, queue_start_step=9750, freeze_prototypes_steps=390 (others: the module's defaults).
Source: solo-learn's scripts/pretrain/cifar/swav.yaml.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar100 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/swav_cifar100.py --workdir=runs/swav_cifar100

Expect: solo-learn's README results table reports 64.88 Acc@1 for SwAV on CIFAR-100 (ResNet-18, 1000
epochs, this recipe). The UMM paper's Table 1 reports 66.56 linear / 57.01 5-NN top-1 for SwAV on
CIFAR-100 (ResNet-18, mean of five runs). This config's stages log the online linear probe's test
accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json), the offline
k-NN and linear protocols (evaluation.json) and report.md.

Notes: SwAV's queue starts after 50 epochs and the prototypes stay frozen for 2 (solo-learn),
converted to steps at 195 steps per epoch.
"""

from configs import recipes


def get_config():
  return recipes.config("swav", "cifar100")
