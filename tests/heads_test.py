"""Heads against NumPy forward passes: MLP (BatchNorm in train and eval mode), cosine-similarity
prototypes, linear classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.models import heads

EPS = 1e-5


def _variables(module, *args, seed, **kwargs):
  """Random variables of `module`'s shapes, drawn in NumPy (BN statistics and affine included)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  leaves, treedef = jax.tree.flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  draw = {"scale": lambda s: rng.uniform(0.5, 1.5, s), "var": lambda s: rng.uniform(0.5, 1.5, s)}
  values = [
    draw.get(path[-1].key, lambda s: rng.normal(0, 0.5, s))(leaf.shape) for path, leaf in leaves
  ]
  return jax.tree.unflatten(treedef, [jnp.asarray(v, jnp.float32) for v in values])


def _np_bn(h, params, stats, train):
  mean, var = (h.mean(0), h.var(0)) if train else (stats["mean"], stats["var"])
  out = (h - mean) / np.sqrt(var + EPS)
  if params:  # last_bn has no learned affine
    out = out * params["scale"] + params["bias"]
  return out


def _np_mlp(x, variables, hidden, *, use_bn, last_bn, train):
  p, s = variables["params"], variables.get("batch_stats", {})
  h = np.asarray(x, np.float64)
  for i in range(len(hidden) + 1):
    dense = p[f"Dense_{i}"]
    h = h @ dense["kernel"] + dense.get("bias", 0.0)
    if i < len(hidden):
      if use_bn:
        h = _np_bn(h, p[f"BatchNorm_{i}"], s[f"BatchNorm_{i}"], train)
      h = np.maximum(h, 0.0)
  if last_bn:
    name = f"BatchNorm_{len(hidden) if use_bn else 0}"
    h = _np_bn(h, p.get(name, {}), s[name], train)
  return h


@pytest.mark.parametrize("use_bias, use_bn", [(True, True), (False, True), (False, False)])
def test_mlp_shape_and_bias_option(use_bias, use_bn):
  mlp = heads.MLP((16, 16), 5, use_bn=use_bn, use_bias=use_bias)
  x = jnp.zeros((4, 7))
  variables = jax.eval_shape(lambda: mlp.init(jax.random.key(0), x, train=False))
  dense = {k: v for k, v in variables["params"].items() if k.startswith("Dense")}
  assert len(dense) == 3
  assert all(("bias" in layer) == use_bias for layer in dense.values())
  assert ("batch_stats" in variables) == use_bn
  out = jax.eval_shape(lambda v: mlp.apply(v, x, train=False), variables)
  assert out.shape == (4, 5)


@pytest.mark.parametrize(
  "hidden, use_bn, last_bn, train",
  [((16,), True, True, True), ((16,), True, True, False), ((), False, False, False)],
)
def test_mlp_matches_numpy(hidden, use_bn, last_bn, train):
  mlp = heads.MLP(hidden, 6, use_bn=use_bn, last_bn=last_bn)
  x = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  variables = _variables(mlp, x, train=False, seed=1)
  if train:
    out, updates = mlp.apply(variables, x, train=True, mutable=["batch_stats"])
  else:
    out = mlp.apply(variables, x, train=False)
  ref = _np_mlp(x, variables, hidden, use_bn=use_bn, last_bn=last_bn, train=train)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  if train and last_bn:
    # Standardised per feature over the batch: BN without affine (SimSiam, MoCo v3).
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var(0), ref.var(0), rtol=1e-4)
    np.testing.assert_allclose(ref.var(0), 1.0, rtol=1e-3)
    # Running statistics move by PyTorch momentum 0.1: new = 0.9 · old + 0.1 · batch mean.
    h = x.astype(np.float64) @ variables["params"]["Dense_0"]["kernel"]
    h = h + variables["params"]["Dense_0"]["bias"]
    old = variables["batch_stats"]["BatchNorm_0"]["mean"]
    new = updates["batch_stats"]["BatchNorm_0"]["mean"]
    np.testing.assert_allclose(new, 0.9 * old + 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)


def test_prototypes_are_cosine_similarities():
  z = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32) * 3.0
  module = heads.Prototypes(num_prototypes=5)
  variables = _variables(module, z, seed=3)
  scores = module.apply(variables, z)
  c = np.asarray(variables["params"]["prototypes"], np.float64)  # [d, K], one prototype a column
  ref = np.array([[zi @ ck / np.linalg.norm(zi) / np.linalg.norm(ck) for ck in c.T] for zi in z])
  assert scores.shape == (6, 5)
  np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-6)


def test_linear_classifier_is_affine():
  x = np.random.default_rng(4).normal(size=(3, 7)).astype(np.float32)
  module = heads.LinearClassifier(num_classes=4)
  variables = _variables(module, x, seed=5)
  logits = module.apply(variables, x)
  p = variables["params"]["Dense_0"]
  assert logits.shape == (3, 4)
  np.testing.assert_allclose(logits, x @ np.asarray(p["kernel"]) + p["bias"], rtol=1e-5, atol=1e-5)
