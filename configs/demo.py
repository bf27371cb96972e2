"""The offline demo on the embedded Fashion-MNIST subset (no downloads), minutes on a CPU.

Run: python -m umm_jax.main --config=configs/demo.py --workdir=runs/demo
Expect: three epochs of SimCLR pre-training of a narrow ResNet-18 (width 16) on the 8,000 embedded
training images at 28 px (checkpoints after each epoch; the online probe's test accuracy in
metrics.jsonl), one epoch of UMM from the last checkpoint (umm/umm/), the layer-wise monitor of
the three pre-training checkpoints and the UMM one (kNN, linear and label-free ΔR of layer1-layer4
on subsets of 2,000 train / 1,000 test images; monitor.json, umm/umm/monitor.json), the offline
kNN and linear probes of the baseline and the +UMM encoder on the full splits (evaluation.json),
and report.md comparing them, with its plots. The README gives the measured run time and
accuracies.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "fashion_mnist_embedded"
  c.data.image_size = 28
  c.model.width = 16
  c.method.name = "simclr"
  c.train.epochs = 3
  c.train.log_every_steps = 10
  c.train.checkpoint_every_epochs = 1
  c.optim.warmup_epochs = 1
  c.monitor.eval_train_images = 2000
  c.monitor.eval_test_images = 1000
  c.monitor.linear_epochs = 50
  c.monitor.num_images = 512
  c.monitor.chunk_size = 256
  c.evaluate.linear_epochs = 100
  # UMM after pre-training (then evaluate and report compare the baseline with +UMM), sized for
  # minutes on a CPU: one epoch, f_late = layer4, the finite-difference hyper-gradient, 4 sketch
  # directions. The paper's settings are the `umm` block's defaults (configs/default.py).
  # The monitor runs after UMM, so it measures the UMM checkpoint too (the paper's Figure 5).
  c.stages = ("pretrain", "umm", "monitor", "evaluate", "report")
  c.umm.epochs = 1
  c.umm.split = "layer3"
  c.umm.hypergrad = "finite_difference"
  c.umm.num_directions = 4
  c.umm.checkpoint_every_epochs = 1
  return c
