"""Tests for umm_jax.optim against NumPy float64 re-implementations of the PyTorch loops.

The LARS reference transcribes solo-learn's `solo/utils/lars.py` step (trust ratio, zero-norm
rule, `ndim != 1` exclusion, `clip_lr`, PyTorch momentum); the SGD and Adam(W) references follow
`torch.optim.SGD`, `torch.optim.Adam` and `torch.optim.AdamW`; the schedules are checked against
their closed forms at the steps where they change regime.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from umm_jax import optim

STEPS_PER_EPOCH, TOTAL_STEPS, GLOBAL_BATCH = 2, 6, 512


def make_params():
  """A `{'backbone', 'heads'}` pytree shaped like flax params: kernels, biases, BatchNorm."""
  rng = np.random.default_rng(0)
  return {
    "backbone": {
      "Conv_0": {"kernel": rng.normal(size=(2, 2, 3, 4))},
      "BatchNorm_0": {"scale": np.ones(4), "bias": np.zeros(4)},
    },
    "heads": {"Dense_0": {"kernel": rng.normal(size=(4, 3)), "bias": 0.1 * rng.normal(size=3)}},
  }


def grad_of(params, xp):
  """Gradient of `Σ ½(w − c)²·k` per leaf (a fixed function, so the loop has feedback)."""

  def leaf(path, w):
    k = 1.0 + (len(jax.tree_util.keystr(path)) % 5)
    c = xp.cos(xp.arange(w.size, dtype=w.dtype).reshape(w.shape))
    return k * (w - c)

  return jax.tree_util.tree_map_with_path(leaf, params)


def hp_with(**overrides):
  hp = dict(optim.DEFAULTS)
  hp.update(base_lr=0.3, weight_decay=1e-2, warmup_epochs=1, warmup_start_lr=0.0, min_lr=0.01)
  hp.update(overrides)
  return hp


def np_warmup_cosine(t, *, peak, start, end, warmup, total):
  if t < warmup:
    return start + (peak - start) * t / warmup
  progress = min((t - warmup) / max(total - warmup, 1), 1.0)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def np_lrs(hp):
  peak = hp["base_lr"] * GLOBAL_BATCH / 256
  warmup = round(hp["warmup_epochs"] * STEPS_PER_EPOCH)
  return [
    np_warmup_cosine(
      t, peak=peak, start=hp["warmup_start_lr"], end=hp["min_lr"], warmup=warmup, total=TOTAL_STEPS
    )
    for t in range(TOTAL_STEPS)
  ]


def run_optax(hp, family, steps=TOTAL_STEPS):
  tx, _ = optim.create(
    hp,
    family=family,
    global_batch=GLOBAL_BATCH,
    steps_per_epoch=STEPS_PER_EPOCH,
    total_steps=TOTAL_STEPS,
  )
  params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), make_params())
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(grad_of(params, jnp), state, params)
    params = jax.tree.map(lambda w, u: w + u, params, updates)
  return params


def np_loop(hp, direction):
  """Runs `direction(w, g, lr, slot, t) -> (w, slot)` per leaf over the steps in float64."""
  params = make_params()
  leaves, treedef = jax.tree.flatten(params)
  slots = [None] * len(leaves)
  for t, lr in enumerate(np_lrs(hp)):
    grads = jax.tree.leaves(grad_of(jax.tree.unflatten(treedef, leaves), np))
    for i, (w, g) in enumerate(zip(leaves, grads, strict=True)):
      leaves[i], slots[i] = direction(w, g, lr, slots[i], t)
  return jax.tree.unflatten(treedef, leaves)


def np_lars_direction(hp):
  wd, eta, eps, mu = hp["weight_decay"], hp["lars_eta"], hp["eps"], hp["momentum"]

  def direction(p, g, lr, buf, t):
    del t
    d = g.copy()
    p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
    if p.ndim != 1 or not hp["exclude_bias_and_norm"]:
      if p_norm != 0 and g_norm != 0:
        lars_lr = p_norm / (g_norm + p_norm * wd + eps) * eta
        if hp["lars_clip"]:
          with np.errstate(divide="ignore"):
            lars_lr = min(lars_lr / np.float64(lr), 1)
        d = (d + wd * p) * lars_lr
    buf = d.copy() if buf is None else mu * buf + d
    return p - lr * buf, buf

  return direction


def np_sgd_direction(hp):
  wd, mu = hp["weight_decay"], hp["momentum"]

  def direction(p, g, lr, buf, t):
    del t
    d = g + wd * p if (p.ndim >= 2 or not hp["exclude_bias_and_norm"]) else g
    buf = d.copy() if buf is None else mu * buf + d
    return p - lr * buf, buf

  return direction


def np_adam_direction(hp, *, decoupled):
  wd, b1, b2, eps = hp["weight_decay"], hp["b1"], hp["b2"], hp["eps"]

  def direction(p, g, lr, slot, t):
    m, v = slot if slot is not None else (np.zeros_like(p), np.zeros_like(p))
    decays = p.ndim >= 2 or not hp["exclude_bias_and_norm"]
    if decays and decoupled:
      p = p * (1 - lr * wd)
    elif decays:
      g = g + wd * p
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), (m, v)

  return direction


def assert_trees_close(actual, expected, tol=1e-6):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_lars_matches_solo_learn(exclude, clip):
  # η = 0.2 makes the clip bind at the last (small-lr) step as well as at lr = 0.
  hp = hp_with(lars_eta=0.2, lars_clip=clip, exclude_bias_and_norm=exclude)
  expected = np_loop(hp, np_lars_direction(hp))
  assert_trees_close(run_optax(hp, "lars"), expected)
  # The parameters moved, differently from plain SGD with momentum.
  assert not np.allclose(
    expected["heads"]["Dense_0"]["kernel"], make_params()["heads"]["Dense_0"]["kernel"]
  )
  sgd = np_loop(hp, np_sgd_direction(hp))
  assert not np.allclose(
    expected["backbone"]["Conv_0"]["kernel"], sgd["backbone"]["Conv_0"]["kernel"]
  )


@pytest.mark.parametrize("exclude", [True, False])
def test_sgd_matches_pytorch_momentum(exclude):
  hp = hp_with(exclude_bias_and_norm=exclude)
  assert_trees_close(run_optax(hp, "sgd"), np_loop(hp, np_sgd_direction(hp)))


@pytest.mark.parametrize("name, decoupled", [("adam", False), ("adamw", True)])
@pytest.mark.parametrize("exclude", [True, False])
def test_adam_weight_decay(name, decoupled, exclude):
  hp = hp_with(base_lr=0.01, weight_decay=0.5, exclude_bias_and_norm=exclude)
  expected = np_loop(hp, np_adam_direction(hp, decoupled=decoupled))
  assert_trees_close(run_optax(hp, name), expected, tol=1e-5)
  other = np_loop(hp, np_adam_direction(hp, decoupled=not decoupled))
  assert not np.allclose(
    expected["heads"]["Dense_0"]["kernel"], other["heads"]["Dense_0"]["kernel"]
  )


def test_empty_name_takes_the_family_and_configdict_is_accepted():
  hp = ml_collections.ConfigDict(hp_with(name=""))
  assert_trees_close(run_optax(hp, "sgd", steps=2), run_optax(hp_with(name="sgd"), "lars", steps=2))


def schedule_of(steps_per_epoch=10, total_steps=100, global_batch=512, **overrides):
  _, schedule = optim.create(
    hp_with(**overrides),
    family="lars",
    global_batch=global_batch,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
  )
  return lambda t: float(schedule(jnp.asarray(t, jnp.int32)))


def test_warmup_cosine_at_key_steps():
  lr = schedule_of(warmup_epochs=2, warmup_start_lr=0.01, min_lr=0.001)
  peak = 0.6  # 0.3 × 512 / 256
  for t, want in [
    (0, 0.01),
    (10, (0.01 + peak) / 2),
    (20, peak),
    (60, (peak + 0.001) / 2),
    (100, 0.001),
    (150, 0.001),
  ]:
    np.testing.assert_allclose(lr(t), want, rtol=1e-6, err_msg=f"step {t}")
  np.testing.assert_allclose(
    lr(37), 0.001 + (peak - 0.001) * 0.5 * (1 + math.cos(math.pi * 17 / 80)), rtol=1e-6
  )


def test_cosine_constant_and_batch_scaling():
  lr = schedule_of(schedule="cosine", min_lr=0.0, warmup_epochs=5)
  np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.6, 0.3, 0.0], rtol=1e-6, atol=1e-7)
  lr = schedule_of(schedule="constant", global_batch=1024)
  np.testing.assert_allclose([lr(0), lr(100)], [1.2, 1.2], rtol=1e-6)
  lr = schedule_of(schedule="constant", global_batch=1024, scale_lr_by_batch=False)
  np.testing.assert_allclose(lr(3), 0.3, rtol=1e-6)
  assert optim.peak_lr(base_lr=0.3, global_batch=4096, scale_by_batch=True) == pytest.approx(4.8)


@pytest.mark.parametrize("per_epoch", [False, True])
def test_exponential_reaches_final(per_epoch):
  lr = schedule_of(schedule="exponential", final_lr=1e-4, exponential_per_epoch=per_epoch)
  peak, gamma = 0.6, (1e-4 / 0.6) ** (1 / 100)
  np.testing.assert_allclose([lr(0), lr(100), lr(130)], [peak, 1e-4, 1e-4], rtol=1e-5)
  if per_epoch:
    np.testing.assert_allclose(
      [lr(9), lr(10), lr(25)], [peak, peak * gamma**10, peak * gamma**20], rtol=1e-5
    )
  else:
    np.testing.assert_allclose([lr(1), lr(37)], [peak * gamma, peak * gamma**37], rtol=1e-5)


def test_decay_mask_selects_kernels_of_a_flax_model():
  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=True)(x)
      return nn.Dense(2)(x.mean((1, 2)))

  params = Tiny().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat == {
    "['BatchNorm_0']['bias']": False,
    "['BatchNorm_0']['scale']": False,
    "['Conv_0']['bias']": False,
    "['Conv_0']['kernel']": True,
    "['Dense_0']['bias']": False,
    "['Dense_0']['kernel']": True,
  }


@pytest.mark.parametrize(
  "overrides, family, valid",
  [
    (dict(name="rmsprop"), "lars", optim.OPTIMIZERS),
    (dict(name=""), "lamb", optim.OPTIMIZERS),
    (dict(schedule="step"), "lars", optim.SCHEDULES),
  ],
)
def test_unknown_names_list_the_valid_ones(overrides, family, valid):
  with pytest.raises(ValueError) as err:
    optim.create(
      hp_with(**overrides), family=family, global_batch=256, steps_per_epoch=10, total_steps=100
    )
  assert all(name in str(err.value) for name in valid)


def test_inconsistent_inputs_raise():
  hp = hp_with()
  del hp["lars_eta"]
  with pytest.raises(ValueError, match="lars_eta"):
    optim.create(hp, family="lars", global_batch=256, steps_per_epoch=10, total_steps=100)
  with pytest.raises(ValueError, match="warmup_steps=100"):
    schedule_of(warmup_epochs=10, total_steps=50)
  with pytest.raises(ValueError, match="final"):
    schedule_of(schedule="exponential", final_lr=0.0)
