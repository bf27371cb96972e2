"""Seconds-long run on synthetic data, used by the end-to-end tests.

Run: python -m umm_jax.main --config=configs/test.py --workdir=/tmp/umm_test
Expect: two epochs of SimCLR pre-training on 64 synthetic images (checkpoints at steps 4 and 8,
`metrics.jsonl`); `monitor.json` with kNN, linear and ΔR of the four layers at both checkpoints;
`evaluation.json` (kNN and linear probe of the last checkpoint); `report.md` with its plots.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "synthetic"
  c.data.image_size = 16
  c.data.synthetic.num_examples = 64
  c.data.synthetic.image_size = 16
  c.model.name = "resnet10"
  c.model.width = 8
  c.method.simclr.proj_hidden_dim = 32
  c.method.simclr.proj_output_dim = 16
  c.train.epochs = 2
  c.train.batch_size = 16
  c.train.log_every_steps = 2
  c.train.eval_batch_size = 32
  c.train.checkpoint_every_epochs = 1
  c.optim.warmup_epochs = 1
  c.evaluate.protocols = ("knn_k5", "linear")  # k = 200 needs more than 64 training images
  c.evaluate.linear_epochs = 5
  c.monitor.linear_epochs = 5
  c.monitor.num_images = 64
  c.monitor.chunk_size = 32
  c.monitor.batch_size = 64
  c.umm.epochs = 1  # UMM: one epoch (4 steps) from the last pre-training checkpoint
  c.umm.split = "layer3"  # the smallest f_late (layer4): the step compiles fastest
  c.umm.num_directions = 4
  c.umm.cg_maxiter = 3
  c.umm.inner_lr = 1e-3
  c.umm.lr = 1e-3
  c.umm.checkpoint_every_epochs = 1
  return c
