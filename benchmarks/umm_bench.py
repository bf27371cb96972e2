"""Cost of one UMM step relative to one pre-training step, for each hyper-gradient mode.

Run (from the repository root):
  python -m benchmarks.umm_bench --width=16 --batch=64 --repeats=3

Both steps are the stages' own (`train.make_train_step`, `umm_stage.make_step`), jitted with the
state donated, on one synthetic batch of CIFAR-size images, SimCLR, ResNet-18 (CIFAR stem) of the
given width, from a freshly initialised state; the first call compiles and is not timed, then the
median of `--repeats` calls. The UMM rows use the `umm` block's defaults (split `layer2`, K = 1,
`sketch` volume with 16 directions, soft membership) with `hypergrad` set to each mode, and the
single-level 'joint' variant for comparison; each bi-level mode runs with the Hessian of `L_in`
(`umm.hessian='full'`, the paper's) and of `L_SSL` alone (`'ssl'`, the JS term's curvature left
out). Printed: seconds per step, the ratio to the pre-training step, and the compile time of each.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks import train_bench
from umm_jax import data, implicit, pretrain, umm, umm_stage


def umm_step(config, variant: str) -> tuple:
  """`(step, state, batch)`: the jitted UMM step of `variant` on `config` (state donated, as the
  `umm` stage runs it), a UMM state from a fresh pre-training state, and the first global batch."""
  train_set = data.load(config.data, "train")
  urun = umm_stage.build(config, train_set, variant)
  mean, std = train_set.channel_stats()
  step = umm_stage.make_step(urun, image_size=config.data.image_size, mean=mean, std=std)
  state = umm_stage.umm_state(urun, pretrain.init_state(urun.pretrain_run, jax.random.key(0)))
  n = config.train.batch_size
  batch = {"image": jnp.asarray(train_set.images[:n]), "label": jnp.asarray(train_set.labels[:n])}
  return jax.jit(step, donate_argnums=0), state, batch


def umm_seconds(config, variant: str, repeats: int) -> tuple[float, float]:
  """`train_bench.step_seconds` of the UMM step of `variant` on `config`'s first global batch."""
  return train_bench.step_seconds(*umm_step(config, variant), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--modes", default=",".join(implicit.HYPERGRADS))
  parser.add_argument("--hessians", default=",".join(umm.HESSIANS))
  parser.add_argument("--split", default=None, help="umm.split (default: the config's)")
  parser.add_argument("--num_directions", type=int, default=None, help="umm.num_directions")
  args = parser.parse_args()
  config = train_bench.synthetic_config(args.batch)
  config.model.width = args.width
  if args.split:
    config.umm.split = args.split
  if args.num_directions:
    config.umm.num_directions = args.num_directions
  print(
    f"SimCLR, ResNet-18 (CIFAR stem, width {args.width}), batch {args.batch} x 2 views of "
    f"{config.data.image_size}px, split {config.umm.split}, {config.umm.num_directions} sketch "
    f"directions, median of {args.repeats}; {train_bench.machine()}"
  )
  base, compile_s = train_bench.pretrain_seconds(config, args.repeats)
  print(f"  {'pre-training step':34s} {base:8.3f} s/step  1.00x  (first call {compile_s:.1f} s)")
  hessians = args.hessians.split(",")
  rows = [(f"UMM, {m}, H {h}", "umm", m, h) for m in args.modes.split(",") for h in hessians]
  rows.append(("joint (single level)", "joint", config.umm.hypergrad, "full"))
  for label, variant, mode, hessian in rows:
    config.umm.hypergrad, config.umm.hessian = mode, hessian
    seconds, compile_s = umm_seconds(config, variant, args.repeats)
    print(
      f"  {label:34s} {seconds:8.3f} s/step {seconds / base:5.2f}x  (first call {compile_s:.1f} s)"
    )


if __name__ == "__main__":
  main()
