"""Tests for umm_jax.methods.simsiam against a NumPy float64 SimSiam loss (the paper's Eq. 4:
`L = ½ D(p₁, sg z₂) + ½ D(p₂, sg z₁)`, `D` the negative cosine similarity)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import simsiam

SIMSIAM = simsiam.METHODS[0]


def np_neg_cos(p, z):
  p, z = np.asarray(p, np.float64), np.asarray(z, np.float64)
  cos = (p * z).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))
  return -cos.mean()


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_negative_cosine_matches_numpy_and_bounds():
  p, z = random((2, 7, 8), 0)
  loss, metrics = jax.jit(simsiam.negative_cosine)(p, z)
  np.testing.assert_allclose(loss, np_neg_cos(p, z), rtol=1e-5)
  np.testing.assert_allclose(metrics["cos_sim"], -loss, rtol=1e-6)
  np.testing.assert_allclose(simsiam.negative_cosine(p, 2.0 * p)[0], -1.0, rtol=1e-6)
  np.testing.assert_allclose(simsiam.negative_cosine(p, -p)[0], 1.0, rtol=1e-6)


def test_objective_matches_numpy_and_stops_gradient_at_projection():
  online = {"projection": random((2, 6, 8), 1), "prediction": random((2, 6, 8), 2)}
  step = jax.jit(lambda o: SIMSIAM.objective(o, None, {}, SIMSIAM.defaults))
  loss, metrics, state = step(online)
  (p1, p2), (z1, z2) = online["prediction"], online["projection"]
  np.testing.assert_allclose(loss, 0.5 * np_neg_cos(p1, z2) + 0.5 * np_neg_cos(p2, z1), rtol=1e-5)
  assert np.isfinite(loss) and state == {}
  assert {"z_std", "z_offdiag_corr", "cos_sim"} <= set(metrics)

  # The projection is only ever a target: its gradient is exactly zero, the prediction's is not.
  grads = jax.grad(lambda o: SIMSIAM.objective(o, None, {}, SIMSIAM.defaults)[0])(online)
  assert np.all(grads["projection"] == 0)
  assert np.abs(grads["prediction"]).max() > 0


def test_negative_cosine_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 6\)"):
    simsiam.negative_cosine(jnp.zeros((4, 8)), jnp.zeros((4, 6)))


def test_heads_shapes_and_projector_output_batchnorm():
  hp = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 8}
  module = SIMSIAM.heads(hp)
  features = {"embedding": jnp.asarray(random((12, 24), 3))}
  variables = module.init(jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  assert out["projection"].shape == (12, 16) and out["prediction"].shape == (12, 16)
  # The last BatchNorm has no affine: in training every projection dimension is standardised.
  z = np.asarray(out["projection"], np.float64)
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.var(0), 1.0, rtol=1e-3)
  assert "Dense_2" in variables["params"]["projector"]
  assert "bias" not in variables["params"]["projector"]["Dense_2"]
