"""Tests for umm_jax.methods.wmse against a NumPy float64 port of the official W-MSE
(`htdt/self-supervised` `methods/whitening.py` `Whitening2d` and `methods/w_mse.py` with
`norm_mse_loss`): each sub-batch of each view is centred and multiplied by the inverse Cholesky
factor of its (shrunk) covariance; the loss is `2 − 2 cos` of paired whitened rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax.methods import wmse

WMSE = wmse.METHODS[0]
_loss = jax.jit(wmse.wmse_loss, static_argnames=("w_size", "eps"))


def np_whiten(x, eps=0.0):
  """`Whitening2d.forward` in training mode without running statistics."""
  x = np.asarray(x, np.float64)
  xn = x - x.mean(0)
  f_cov = xn.T @ xn / (len(x) - 1)
  eye = np.eye(x.shape[1])
  inv_sqrt = np.linalg.inv(np.linalg.cholesky((1 - eps) * f_cov + eps * eye))
  return xn @ inv_sqrt.T  # the 1 × 1 convolution with weight inv_sqrt


def np_wmse(z1, z2, *, w_size, eps=0.0):
  """`WMSE.forward` for two views with the sub-batches `[0, w), [w, 2w), ...` (one w_iter)."""
  n = len(z1)
  white = []
  for z in (z1, z2):
    white.append(np.concatenate([np_whiten(z[i : i + w_size], eps) for i in range(0, n, w_size)]))
  x0, x1 = (w / np.linalg.norm(w, axis=1, keepdims=True) for w in white)
  return 2 - 2 * np.mean(np.sum(x0 * x1, axis=1))


def random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def correlated(shape, seed):
  """Embeddings with correlated dimensions of unequal scales: a random rotation of scales 0.5 to 3
  (covariance condition number about 36, so float32 whitening holds to 1e-4), offset by 3."""
  rng = np.random.default_rng(seed + 100)
  rotation, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[1])))
  mix = np.linspace(0.5, 3.0, shape[1])[:, None] * rotation
  return (random(shape, seed) @ mix + 3.0).astype(np.float32)


def test_whitened_covariance_is_the_identity():
  x = correlated((24, 6), 0)
  white = np.asarray(jax.jit(wmse.whiten)(x), np.float64)
  np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(6), atol=1e-4)
  np.testing.assert_allclose(white, np_whiten(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("w_size, eps", [(16, 0.0), (8, 0.0), (64, 0.0), (16, 0.1)])
def test_wmse_loss_matches_official_code(w_size, eps):
  z1 = correlated((32, 5), 1)
  z2 = z1 + 0.5 * random((32, 5), 2)
  loss, metrics = _loss(z1, z2, w_size=w_size, eps=eps)
  np.testing.assert_allclose(loss, np_wmse(z1, z2, w_size=min(w_size, 32), eps=eps), rtol=1e-5)
  np.testing.assert_allclose(metrics["cos_sim"], 1 - loss / 2, rtol=1e-6)


def test_sub_batches_are_whitened_independently():
  z1, z2 = correlated((24, 4), 3), correlated((24, 4), 4)
  loss, _ = _loss(z1, z2, w_size=8)
  # The loss is the mean of the three sub-batches' own W-MSE losses ...
  parts = [float(_loss(z1[i : i + 8], z2[i : i + 8], w_size=8)[0]) for i in (0, 8, 16)]
  np.testing.assert_allclose(loss, np.mean(parts), rtol=1e-5)
  # ... so changing the last sub-batch leaves the first two sub-batches' terms as they were.
  z1_changed = z1.copy()
  z1_changed[16:] = 10.0 * correlated((8, 4), 5)
  changed, _ = _loss(z1_changed, z2, w_size=8)
  last = float(_loss(z1_changed[16:], z2[16:], w_size=8)[0])
  np.testing.assert_allclose(changed, (parts[0] + parts[1] + last) / 3, rtol=1e-5)
  assert not np.isclose(float(changed), float(loss))


def test_small_sub_batches_need_shrinkage():
  z1, z2 = random((8, 16), 6), random((8, 16), 7)
  # w = 8 ≤ d = 16: the covariance is singular; the official Cholesky fails, so does this.
  with pytest.raises(ValueError, match=r"8 embeddings of dimension 16"):
    wmse.wmse_loss(z1, z2, w_size=128)
  # With shrinkage the covariance is positive definite, as in the official Whitening2d.
  loss, _ = _loss(z1, z2, w_size=128, eps=0.1)
  np.testing.assert_allclose(loss, np_wmse(z1, z2, w_size=8, eps=0.1), rtol=1e-4)
  # The whitened covariance is then the identity on the span of the centred rows (rank w − 1)
  # up to the shrinkage, eigenvalues λ / ((1 − eps) λ + eps) ≤ 1 / (1 − eps), and 0 elsewhere.
  eig = np.linalg.eigvalsh(np.cov(np.asarray(wmse.whiten(z1, eps=0.1), np.float64), rowvar=False))
  assert np.all(eig[:9] < 1e-4) and np.all((eig[9:] > 0.5) & (eig[9:] < 1 / 0.9 + 1e-4))


def test_wmse_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\(8, 4\).*\(8, 3\)"):
    wmse.wmse_loss(jnp.zeros((8, 4)), jnp.zeros((8, 3)), w_size=8)
  with pytest.raises(ValueError, match="must divide the batch size 12"):
    wmse.wmse_loss(jnp.zeros((12, 4)), jnp.zeros((12, 4)), w_size=8)
  with pytest.raises(ValueError, match=r"\(8,\)"):
    wmse.whiten(jnp.zeros((8,)))


def test_heads_and_objective():
  hp = {**WMSE.defaults, "proj_hidden_dim": 16, "proj_output_dim": 4, "w_size": 8}
  module = WMSE.heads(hp)
  features = {"embedding": jnp.asarray(random((32, 10), 8))}
  variables = module.init(jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  assert out["projection"].shape == (32, 4)
  online = {"projection": out["projection"].reshape(2, 16, 4)}
  loss, metrics, state = jax.jit(lambda o: WMSE.objective(o, None, {}, hp))(online)
  z = np.asarray(online["projection"])
  np.testing.assert_allclose(loss, np_wmse(z[0], z[1], w_size=8), rtol=1e-4)
  assert state == {} and {"z_std", "z_offdiag_corr", "cos_sim"} <= set(metrics)
  assert WMSE.defaults["w_eps"] == 0.0 and WMSE.optimizer == "adam"
