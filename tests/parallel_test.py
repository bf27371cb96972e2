"""Data parallelism: the step on a 4-device mesh equals the single-device step (global batch)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from umm_jax import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh process: the number of simulated CPU devices is fixed when JAX starts.
_SCRIPT = textwrap.dedent(
  """
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from configs import test as test_config
  from umm_jax import data, parallel, pretrain, train

  assert jax.device_count() == 4, jax.devices()
  config = test_config.get_config()
  config.method.name = sys.argv[2]
  train_set = data.load(config.data, "train")
  run = pretrain.build(config, train_set)
  mean, std = train_set.channel_stats()
  images, labels = next(data.batches(train_set, global_batch=16, seed=0, epoch=0))
  results = {}
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    step = train.make_train_step(
      model=run.model, heads=run.heads, method=run.method, hp=run.hp, tx=run.tx,
      probe_tx=run.probe_tx, num_classes=run.num_classes, image_size=16,
      mean=jnp.asarray(mean), std=jnp.asarray(std), total_steps=run.total_steps,
    )
    step = jax.jit(step, donate_argnums=0, out_shardings=parallel.replicated(mesh))
    state = parallel.replicate(pretrain.init_state(run, jax.random.key(0)), mesh)
    put = lambda x: parallel.global_batch(x, mesh)
    batch = {"image": put(images), "label": put(labels)}
    assert len(batch["image"].sharding.device_set) == n
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(1))
    leaves = jax.tree.leaves(jax.device_get((state.online, state.probe)))
    results[n] = {f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)}
    results[n]["loss"] = np.asarray(metrics["loss"])
  np.savez(sys.argv[1] + "/one.npz", **results[1])
  np.savez(sys.argv[1] + "/four.npz", **results[4])
  """
)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_four_devices_match_one(tmp_path, method):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "PYTHONPATH": str(ROOT),
  }
  subprocess.run(
    [sys.executable, "-c", _SCRIPT, str(tmp_path), method],
    cwd=ROOT,
    env=env,
    check=True,
    timeout=600,
  )
  one, four = np.load(tmp_path / "one.npz"), np.load(tmp_path / "four.npz")
  assert set(one) == set(four) and len(one) > 10
  for key in one:
    np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_global_batch_must_divide_over_devices():
  mesh = parallel.make_mesh()
  parallel.check_global_batch(mesh.devices.size * 3, mesh)
  if mesh.devices.size > 1:
    with pytest.raises(ValueError, match="divisible by the number of devices"):
      parallel.check_global_batch(mesh.devices.size + 1, mesh)
