"""BCL-I on CIFAR-10-LT, then UMM: a row of the UMM paper's Table 8.

CIFAR-10-LT: the long-tail subset of CIFAR-10's train split with imbalance ratio 100 (Cao et al.
2019; class sizes from 5000 down to 50, 12,406 images, a seeded draw per class); the test split
stays balanced. ResNet-18 with the CIFAR stem on 32-px views; global batch 512, 2000 epochs
(24 steps per epoch); checkpoints every 5 epochs for the monitor. Stages: pretrain, monitor,
umm (the UMM fine-tuning of the last checkpoint), evaluate (kNN and linear probes of the
pre-trained and the UMM encoders) and report.

Recipe (configs/recipes.py, RECIPES["cifar_lt"]): SGD (momentum 0.9), lr 0.25 x batch/256 (0.5 at
batch 512), weight decay 5e-4; 10 warm-up epochs from 3e-5, then cosine to 0. BCL-I:
proj_hidden_dim=512, proj_output_dim=128, temperature=0.2, momentum=0.95, num_samples=12406 (one
memorization score per image), steps_per_epoch=24. Source: MediaBrain-SJTU/BCL
bash_scripts/cifar-LT-BCL.sh.

BCL-I reads each image's row in the training set from the batch field `index`: the pre-training
loop must pass `data.batches(..., with_index=True)`'s rows as `batch["index"]`, or the first step
stops with a ValueError saying so.

Data: prepare once (TensorFlow is needed for this step only) with `pip install tensorflow && tfds
build cifar10 --file_format=array_record`; for a directory other than tfds' default add
`--data_dir=<dir>` there and `--config.data.data_dir=<dir>` to the run.

Run:
  python -m umm_jax.main --config=configs/bcl_i_cifar10_lt.py --workdir=runs/bcl_i_cifar10_lt

Expect: the UMM paper's Table 8 reports 81.99 linear-probe top-1 for BCL-I on CIFAR-10-LT and 85.62
after UMM (ResNet-18; the paper states neither the imbalance ratio, 100 is assumed here, nor the
number of runs). The paper places Table 8 under out-of-distribution experiments with 300K Random
Images as the OOD set for the CIFAR-LT sets; this config probes the balanced test split. The
evaluate stage writes both encoders' linear and kNN accuracies (evaluation.json), report.md compares
them.
"""

from configs import recipes


def get_config():
  c = recipes.config("bcl_i", "cifar10_lt")
  c.stages = recipes.with_umm(c.stages)
  return c
