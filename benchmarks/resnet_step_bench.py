"""Times a ResNet SGD step (forward + backward + update) with each convolution implementation.

Run (from the repository root):
  python benchmarks/resnet_step_bench.py --model=resnet18 --batch=64 --size=32 --repeats=3

One jitted step of cross-entropy on the logits of a CIFAR-stem ResNet (train-mode BatchNorm,
SGD with momentum 0.9) on random `[batch, size, size, 3]` images; the first call compiles and
is not timed, then the median of `--repeats` steps is printed per `conv_impl` as ms/step and
images/s, with the speed-up of 'cpu_fast' over 'xla'. 'cpu_fast' only pays off on the CPU
backend (see `umm_jax.models.resnet.conv2d`).
"""

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from umm_jax.models import resnet

NUM_CLASSES = 10


def make_step(model, tx):
  """`step(params, batch_stats, opt_state, x, labels) -> (params, batch_stats, opt_state, loss)`."""

  def loss_fn(params, batch_stats, x, labels):
    out, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels).mean()
    return loss, updates["batch_stats"]

  def step(params, batch_stats, opt_state, x, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, x, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def time_step(name: str, conv_impl: str, batch: int, size: int, repeats: int) -> float:
  """Median seconds of one compiled training step."""
  model = resnet.create(name, stem="cifar", num_classes=NUM_CLASSES, conv_impl=conv_impl)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x[:1])
  tx = optax.sgd(0.1, momentum=0.9)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  step = make_step(model, tx)
  *state, loss = step(*state, x, labels)  # compiles
  jax.block_until_ready(loss)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    *state, loss = step(*state, x, labels)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18", choices=sorted(resnet.ARCHITECTURES))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(
    f"{args.model} CIFAR stem, batch {args.batch}, {args.size}x{args.size}x3, SGD step, "
    f"median of {args.repeats}; jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"
  )
  seconds = {}
  for conv_impl in ("xla", "cpu_fast"):
    seconds[conv_impl] = time_step(args.model, conv_impl, args.batch, args.size, args.repeats)
    ms, rate = 1e3 * seconds[conv_impl], args.batch / seconds[conv_impl]
    print(f"  {conv_impl:8s} {ms:9.1f} ms/step {rate:9.1f} images/s")
  print(f"  cpu_fast speed-up over xla: {seconds['xla'] / seconds['cpu_fast']:.2f}x")


if __name__ == "__main__":
  main()
