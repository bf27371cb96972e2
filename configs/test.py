"""Seconds-long run on synthetic data, used by the end-to-end tests.

Run: python -m umm_jax.main --config=configs/test.py --workdir=/tmp/umm_test
Expect: a `monitor.json` in the work dir with a finite ΔR for each of the four layers.
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
  c.monitor.num_images = 64
  c.monitor.chunk_size = 32
  c.monitor.batch_size = 64
  return c
