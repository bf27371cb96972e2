"""The offline demo on the embedded Fashion-MNIST subset (no downloads), a few minutes on a CPU.

Run: python -m umm_jax.main --config=configs/demo.py --workdir=runs/demo
Expect: the label-free ΔR of each ResNet-18 stage of a randomly initialised encoder, on two
augmented views of 1024 training images, printed and written to runs/demo/monitor.json.
Later stages (pre-training, UMM, evaluation) join this demo as they land.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "fashion_mnist_embedded"
  c.method.name = "simclr"
  return c
