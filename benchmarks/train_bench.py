"""Images/s of the SimCLR pre-training step (ResNet-18, CIFAR size), and PyTorch's when installed.

Run (from the repository root):
  python -m benchmarks.train_bench --batch=256 --repeats=3

JAX: `umm_jax.train.make_train_step` as the `pretrain` stage runs it (jitted, state donated):
on-device augmentation of two views, ResNet-18 (CIFAR stem) on each view, SimCLR's projector
(2048 → 256) and NT-Xent, LARS, the online probe; the first call compiles and is not timed,
then the median of `--repeats` steps. PyTorch (if `import torch` works): the same network,
projector, loss and an SGD-momentum step on pre-made views (no augmentation, so it does less
work), float32, channels-last memory format as its fastest CPU layout. Both sides print
images/s (source images, two views each) and the ratio.
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from umm_jax import data, pretrain, train

SIZE = 32


def machine() -> str:
  """`jax <version> on <backend> (<device kind>), <processor>`: where a figure was measured."""
  device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
  return f"jax {jax.__version__} on {device}, {platform.processor() or platform.machine()}"


def synthetic_config(batch: int, size: int = SIZE):
  """`configs/default.py` on one global batch of `batch` synthetic `size`² RGB images."""
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.synthetic.update(num_examples=batch, image_size=size, channels=3)
  config.data.image_size = size
  config.train.batch_size = batch
  config.optim.warmup_epochs = 0
  return config


def step_seconds(step, state, batch: dict, repeats: int) -> tuple[float, float]:
  """`(median seconds of a call, seconds of the first, compiling, call)` of
  `step(state, batch, key) -> (state, metrics)`, jitted by the caller."""
  key = jax.random.key(1)
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times[1:])), times[0]


def pretrain_step(config) -> tuple:
  """`(step, state, batch)`: the jitted pre-training step of `config` (state donated, as the
  `pretrain` stage runs it), its initial state and the first global batch."""
  train_set = data.load(config.data, "train")
  run = pretrain.build(config, train_set)
  mean, std = train_set.channel_stats()
  step = train.make_train_step(
    model=run.model,
    heads=run.heads,
    method=run.method,
    hp=run.hp,
    tx=run.tx,
    probe_tx=run.probe_tx,
    num_classes=run.num_classes,
    image_size=config.data.image_size,
    mean=jnp.asarray(mean),
    std=jnp.asarray(std),
    total_steps=run.total_steps,
  )
  state = pretrain.init_state(run, jax.random.key(0))
  n = config.train.batch_size
  batch = {"image": jnp.asarray(train_set.images[:n]), "label": jnp.asarray(train_set.labels[:n])}
  return jax.jit(step, donate_argnums=0), state, batch


def pretrain_seconds(config, repeats: int) -> tuple[float, float]:
  """`step_seconds` of the pre-training step of `config` on its first global batch."""
  return step_seconds(*pretrain_step(config), repeats)


def torch_seconds(batch: int, repeats: int) -> float:
  """Median seconds of the same network, projector and loss in PyTorch, with SGD momentum."""
  import torch
  from torch import nn
  from torch.nn import functional

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
      y = functional.relu(self.bn1(self.conv1(x)))
      return functional.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
  cin = 64
  for i, cout in enumerate((64, 128, 256, 512)):
    layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
    cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  projector = [nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 256)]
  net = nn.Sequential(*layers, *projector).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
  views = [torch.randn(batch, 3, SIZE, SIZE).to(memory_format=torch.channels_last) for _ in "12"]

  def step():
    z = functional.normalize(torch.cat([net(v) for v in views]), dim=1)
    logits = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * batch) + batch) % (2 * batch)
    loss = functional.cross_entropy(logits, target)
    opt.zero_grad()
    loss.backward()
    opt.step()

  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(
    f"SimCLR step, ResNet-18 CIFAR stem, batch {args.batch} x 2 views of {SIZE}x{SIZE}x3, "
    f"median of {args.repeats}; {machine()}"
  )
  jax_s, _ = pretrain_seconds(synthetic_config(args.batch), args.repeats)
  print(f"  jax    {1e3 * jax_s:9.1f} ms/step {args.batch / jax_s:8.1f} images/s")
  try:
    import torch
  except ImportError:
    print("  torch  not installed: no reference")
    return
  torch_s = torch_seconds(args.batch, args.repeats)
  rate = args.batch / torch_s
  print(f"  torch  {1e3 * torch_s:9.1f} ms/step {rate:8.1f} images/s (torch {torch.__version__})")
  print(f"  jax / torch throughput: {torch_s / jax_s:.2f}")


if __name__ == "__main__":
  main()
