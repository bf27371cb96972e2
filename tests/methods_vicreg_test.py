"""Tests for umm_jax.methods.vicreg: VICReg and VICRegL against NumPy float64 ports of the official
code (`facebookresearch/vicreg` `main_vicreg.py`; `facebookresearch/VICRegL` `main_vicregl.py`
and `transforms.py`), and VICRegL's location matching against a brute-force search on
hand-built crop boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from umm_jax.methods import vicreg

VICREG, VICREGL = vicreg.METHODS
COEFFS = {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}


def random(shape, seed, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def np_off_diagonal_sq_sum(c):
  return np.sum(c**2, axis=(-2, -1)) - np.sum(np.diagonal(c, axis1=-2, axis2=-1) ** 2, axis=-1)


# --------------------------------------------------------------------------------------------
# VICReg
# --------------------------------------------------------------------------------------------


def np_vicreg(x, y, *, sim_coeff, std_coeff, cov_coeff, variance_halving=True):
  """`main_vicreg.py`'s `VICReg.forward` after the projector; `variance_halving=False` sums."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n, d = x.shape
  repr_loss = np.mean((x - y) ** 2)
  x, y = x - x.mean(0), y - y.mean(0)
  std_x, std_y = np.sqrt(x.var(0, ddof=1) + 1e-4), np.sqrt(y.var(0, ddof=1) + 1e-4)
  hinge = np.mean(np.maximum(1 - std_x, 0)) + np.mean(np.maximum(1 - std_y, 0))
  std_loss = hinge / 2 if variance_halving else hinge
  cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
  cov_loss = np_off_diagonal_sq_sum(cov_x) / d + np_off_diagonal_sq_sum(cov_y) / d
  return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


@pytest.mark.parametrize("halving", [True, False])
def test_vicreg_loss_matches_official_code(halving):
  z1, z2 = random((12, 6), 0, 0.7), random((12, 6), 1, 0.7)
  hp = {"sim_coeff": 20.0, "std_coeff": 30.0, "cov_coeff": 2.0, "variance_halving": halving}
  loss, _ = jax.jit(lambda a, b: vicreg.vicreg_loss(a, b, **hp))(z1, z2)
  np.testing.assert_allclose(loss, np_vicreg(z1, z2, **hp), rtol=1e-5)


def test_variance_halving_halves_exactly_the_variance_term():
  z1, z2 = random((10, 5), 2, 0.5), random((10, 5), 3, 0.5)
  _, halved = vicreg.vicreg_loss(z1, z2, variance_halving=True)
  _, summed = vicreg.vicreg_loss(z1, z2, variance_halving=False)
  assert float(summed["variance"]) > 0
  np.testing.assert_allclose(halved["variance"], summed["variance"] / 2, rtol=1e-6)
  for term in ("invariance", "covariance"):
    np.testing.assert_array_equal(halved[term], summed[term])


def test_variance_term_is_zero_when_every_std_exceeds_gamma():
  z = random((16, 6), 4, 3.0)
  assert np.all(z.std(0, ddof=1) > 1.05)
  assert float(vicreg.variance_loss(z)) == 0.0
  # ... and positive, with the closed form mean(1 − sqrt(Var + eps)), when every std is below 1.
  small = 0.1 * z
  expected = np.mean(1 - np.sqrt(small.astype(np.float64).var(0, ddof=1) + 1e-4))
  np.testing.assert_allclose(vicreg.variance_loss(small), expected, rtol=1e-5)


def test_vicreg_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"\(8, 16\).*\(8, 15\)"):
    vicreg.vicreg_loss(jnp.zeros((8, 16)), jnp.zeros((8, 15)))
  with pytest.raises(ValueError, match=r"\(8,\)"):
    vicreg.variance_loss(jnp.zeros((8,)))
  with pytest.raises(ValueError, match=r"\(1, 4\)"):
    vicreg.covariance_loss(jnp.zeros((1, 4)))


def test_vicreg_heads_and_objective():
  hp = {**VICREG.defaults, "proj_hidden_dim": 16, "proj_output_dim": 8}
  module = VICREG.heads(hp)
  features = {"embedding": jnp.asarray(random((12, 10), 5))}
  variables = module.init(jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  assert set(out) == {"projection"} and out["projection"].shape == (12, 8)
  online = {"projection": out["projection"].reshape(2, 6, 8)}
  loss, metrics, state = jax.jit(lambda o: VICREG.objective(o, None, {}, hp))(online)
  z = np.asarray(online["projection"])
  np.testing.assert_allclose(loss, np_vicreg(z[0], z[1], **COEFFS), rtol=1e-5)
  assert state == {} and {"z_std", "z_offdiag_corr", "variance"} <= set(metrics)


# --------------------------------------------------------------------------------------------
# VICRegL: NumPy port of the official code
# --------------------------------------------------------------------------------------------


def np_location_grid(box, flip, n_rows, n_cols):
  """`transforms._location_to_NxN_grid` (accumulated cell sizes, then the flip swap), in
  fractions of the source; one box `(y0, x0, h, w)`."""
  i, j, h, w = np.asarray(box, np.float64)
  grid = np.zeros((n_rows, n_cols, 2))
  grid[0, 0] = (i + h / n_rows / 2, j + w / n_cols / 2)
  for k in range(n_rows):
    for col in range(n_cols):
      if k > 0:
        grid[k, col, 0] = grid[k - 1, col, 0] + h / n_rows
      else:
        grid[k, col, 0] = grid[0, 0, 0]
      if col > 0:
        grid[k, col, 1] = grid[k, col - 1, 1] + w / n_cols
      else:
        grid[k, col, 1] = grid[0, 0, 1]
  if flip:
    grid = grid[:, ::-1].copy()
  return grid


def np_grids(boxes, flips, n_rows, n_cols):
  return np.stack(
    [np_location_grid(b, f, n_rows, n_cols) for b, f in zip(boxes, flips, strict=True)]
  )


def np_neirest_neighbores(input_maps, candidate_maps, distances, num_matches):
  """The official `neirest_neighbores`: sort the queries' nearest distances, mask the best
  `num_matches`, and masked-select (which keeps the query order)."""
  batch, num_queries = distances.shape[:2]
  num_matches = num_queries if num_matches is None else min(num_matches, num_queries)
  nearest_value, nearest_index = distances.min(-1), distances.argmin(-1)
  rank = np.argsort(np.argsort(nearest_value, axis=1, kind="stable"), axis=1, kind="stable")
  mask = rank < num_matches
  queries = np.stack([np.arange(num_queries)[mask[b]] for b in range(batch)])
  candidates = np.stack([nearest_index[b][mask[b]] for b in range(batch)])
  rows = np.arange(batch)[:, None]
  return input_maps[rows, queries], candidate_maps[rows, candidates], queries, candidates


def np_cdist(a, b):
  return np.sqrt(np.sum((a[:, :, None] - b[:, None]) ** 2, -1))


def np_vicreg_local(x, y, *, sim_coeff, std_coeff, cov_coeff):
  """The official `VICRegL._vicreg_loss` on matched maps `[B, K, C]`."""
  repr_loss = sim_coeff * np.mean((x - y) ** 2)
  x, y = x - x.mean(0), y - y.mean(0)
  std_x, std_y = np.sqrt(x.var(0, ddof=1) + 1e-4), np.sqrt(y.var(0, ddof=1) + 1e-4)
  std_loss = std_coeff * (
    np.mean(np.maximum(1 - std_x, 0)) / 2 + np.mean(np.maximum(1 - std_y, 0)) / 2
  )
  x, y = x.transpose(1, 0, 2), y.transpose(1, 0, 2)
  _, sample_size, num_channels = x.shape
  x, y = x - x.mean(-2, keepdims=True), y - y.mean(-2, keepdims=True)
  cov_x = np.einsum("knc,knd->kcd", x, x) / (sample_size - 1)
  cov_y = np.einsum("knc,knd->kcd", y, y) / (sample_size - 1)
  cov = np_off_diagonal_sq_sum(cov_x) / num_channels / 2
  cov = cov + np_off_diagonal_sq_sum(cov_y) / num_channels / 2
  return repr_loss, std_loss, cov_coeff * cov.mean()


def np_local_pair(maps_1, maps_2, location_1, location_2, *, num_matches, l2_all_matches, coeffs):
  """The official `VICRegL._local_loss` (maps `[B, H·W, C]`, locations `[B, H, W, 2]`)."""
  totals = np.zeros(3)
  location_1 = location_1.reshape(len(location_1), -1, 2)
  location_2 = location_2.reshape(len(location_2), -1, 2)
  l2_matches = [None, None] if l2_all_matches else num_matches
  for distances, counts in (
    (np_cdist(maps_1, maps_2), l2_matches),
    (np_cdist(location_1, location_2), num_matches),
  ):
    a = np_neirest_neighbores(maps_1, maps_2, distances, counts[0])[:2]
    b = np_neirest_neighbores(maps_2, maps_1, distances.transpose(0, 2, 1), counts[1])[:2]
    totals += np.array(np_vicreg_local(*a, **coeffs)) / 2
    totals += np.array(np_vicreg_local(*b, **coeffs)) / 2
  return totals


def np_vicregl(z, maps, grids, *, alpha, num_matches, l2_all_matches, coeffs):
  """The official `VICRegL.forward` loss for two views: `z` `[2, B, d]`, `maps` `[2, B, H, W, C]`,
  `grids` `[2, B, H, W, 2]`. Returns `(loss, global, local)`."""
  z, maps, grids = (np.asarray(a, np.float64) for a in (z, maps, grids))
  d = z.shape[-1]
  inv = coeffs["sim_coeff"] * np.mean((z[0] - z[1]) ** 2)  # (mse(0, 1) + mse(1, 0)) / 2
  var, cov = 0.0, 0.0
  for x in z:
    x = x - x.mean(0)
    var += np.mean(np.maximum(1 - np.sqrt(x.var(0, ddof=1) + 1e-4), 0))
    cov += np_off_diagonal_sq_sum(x.T @ x / (len(x) - 1)) / d
  global_loss = inv + coeffs["std_coeff"] * var / 2 + coeffs["cov_coeff"] * cov / 2
  flat = maps.reshape(2, maps.shape[1], -1, maps.shape[-1])
  local = np.zeros(3)
  for i, j in ((0, 1), (1, 0)):
    local += np_local_pair(
      flat[i],
      flat[j],
      grids[i],
      grids[j],
      num_matches=num_matches,
      l2_all_matches=l2_all_matches,
      coeffs=coeffs,
    )
  local_loss = local.sum() / 2
  return alpha * global_loss + (1 - alpha) * local_loss, global_loss, local_loss


def random_boxes(n, seed):
  rng = np.random.default_rng(seed)
  size = rng.uniform(0.3, 1.0, size=(n, 2))
  corner = rng.uniform(0, 1, size=(n, 2)) * (1 - size)
  boxes = np.concatenate([corner, size], axis=1).astype(np.float32)
  return boxes, rng.uniform(size=n) < 0.5


# --------------------------------------------------------------------------------------------
# VICRegL: location grids and matching
# --------------------------------------------------------------------------------------------


def test_location_grid_matches_official_grid():
  boxes, flips = random_boxes(6, 0)
  grid = vicreg.location_grid(jnp.asarray(boxes), jnp.asarray(flips), height=3, width=4)
  assert grid.shape == (6, 3, 4, 2) and flips.any() and not flips.all()
  np.testing.assert_allclose(grid, np_grids(boxes, flips, 3, 4), rtol=1e-5, atol=1e-6)


def location_matches(box1, flip1, box2, flip2, size, num_matches):
  """The matched (query, candidate) cell indices of one view pair, via the module."""
  grids = [
    vicreg.location_grid(jnp.asarray([b], jnp.float32), jnp.asarray([f]), height=size, width=size)
    for b, f in ((box1, flip1), (box2, flip2))
  ]
  g1, g2 = (g.reshape(1, size * size, 2) for g in grids)
  distances = jnp.sum((g1[:, :, None] - g2[:, None]) ** 2, -1)
  query, candidate = vicreg.nearest_neighbors(distances, num_matches)
  return np.asarray(query[0]), np.asarray(candidate[0])


@pytest.mark.parametrize("num_matches", [16, 5])
def test_identical_boxes_match_each_location_to_itself(num_matches):
  box = (0.1, 0.2, 0.6, 0.7)
  query, candidate = location_matches(box, False, box, False, 4, num_matches)
  # Every distance is 0: the lowest indices win the ties.
  np.testing.assert_array_equal(query, np.arange(num_matches))
  np.testing.assert_array_equal(candidate, query)


@pytest.mark.parametrize("flip_first", [False, True])
def test_flipped_view_matches_mirrored_locations(flip_first):
  box, size = (0.05, 0.15, 0.8, 0.6), 4
  query, candidate = location_matches(box, flip_first, box, not flip_first, size, 16)
  rows, cols = np.divmod(query, size)
  np.testing.assert_array_equal(candidate, rows * size + (size - 1 - cols))


@pytest.mark.parametrize(
  "box1, flip1, box2, flip2",
  [
    ((0.0, 0.0, 1.0, 1.0), False, (0.21, 0.33, 0.52, 0.47), False),  # zoomed in
    ((0.1, 0.05, 0.7, 0.6), False, (0.27, 0.31, 0.66, 0.62), True),  # shifted and flipped
    ((0.4, 0.1, 0.5, 0.85), True, (0.0, 0.0, 0.93, 0.71), True),  # both flipped
  ],
)
@pytest.mark.parametrize("num_matches", [5, 16])
def test_location_matching_matches_brute_force(box1, flip1, box2, flip2, num_matches):
  size = 4
  query, candidate = location_matches(box1, flip1, box2, flip2, size, num_matches)
  g1 = np_location_grid(box1, flip1, size, size).reshape(-1, 2)
  g2 = np_location_grid(box2, flip2, size, size).reshape(-1, 2)
  dist = np.array([[np.hypot(*(p - q)) for q in g2] for p in g1])
  nearest = [int(np.argmin(row)) for row in dist]
  best = sorted(range(len(g1)), key=lambda i: (dist[i, nearest[i]], i))[:num_matches]
  np.testing.assert_array_equal(query, sorted(best))
  np.testing.assert_array_equal(candidate, [nearest[i] for i in sorted(best)])


def test_feature_matching_matches_brute_force():
  maps1, maps2 = random((3, 9, 5), 1), random((3, 9, 5), 2)
  distances = vicreg._squared_distances(jnp.asarray(maps1), jnp.asarray(maps2))
  query, candidate = vicreg.nearest_neighbors(distances, 4)
  *_, np_query, np_candidate = np_neirest_neighbores(
    maps1, maps2, np_cdist(maps1.astype(np.float64), maps2.astype(np.float64)), 4
  )
  np.testing.assert_array_equal(query, np_query)
  np.testing.assert_array_equal(candidate, np_candidate)


# --------------------------------------------------------------------------------------------
# VICRegL: loss, objective, heads
# --------------------------------------------------------------------------------------------


def vicregl_inputs(seed, n=6, size=3, c=5, d=7):
  z = random((2, n, d), seed, 0.8)
  maps = random((2, n, size, size, c), seed + 1, 0.8)
  (b1, f1), (b2, f2) = random_boxes(n, seed + 2), random_boxes(n, seed + 3)
  return z, maps, np.stack([b1, b2]), np.stack([f1, f2])


@pytest.mark.parametrize(
  "alpha, num_matches, l2_all_matches",
  [(0.75, (5, 2), True), (0.3, (4, 7), False), (0.75, (20, 4), True)],
)
def test_vicregl_loss_matches_official_code(alpha, num_matches, l2_all_matches):
  z, maps, boxes, flips = vicregl_inputs(10)
  grids = np.stack([np_grids(boxes[v], flips[v], 3, 3) for v in (0, 1)]).astype(np.float32)
  fn = jax.jit(
    lambda z1, z2, m1, m2, g1, g2: vicreg.vicregl_loss(
      z1,
      z2,
      m1,
      m2,
      g1,
      g2,
      alpha=alpha,
      num_matches=num_matches,
      l2_all_matches=l2_all_matches,
      **COEFFS,
    )
  )
  loss, metrics = fn(z[0], z[1], maps[0], maps[1], grids[0], grids[1])
  expected, global_loss, local_loss = np_vicregl(
    z,
    maps,
    grids,
    alpha=alpha,
    num_matches=num_matches,
    l2_all_matches=l2_all_matches,
    coeffs=COEFFS,
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["global_loss"], global_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["local_loss"], local_loss, rtol=1e-5)


@pytest.mark.parametrize("flip_grid", [True, False])
def test_vicregl_objective_from_boxes_and_flips(flip_grid):
  z, maps, boxes, flips = vicregl_inputs(20)
  hp = {**VICREGL.defaults, "flip_grid": flip_grid}
  online = {"projection": z, "local_projection": maps, "box": boxes, "flip": flips}
  loss, metrics, state = jax.jit(lambda o: VICREGL.objective(o, None, {}, hp))(online)
  grid_flips = flips if flip_grid else np.zeros_like(flips)
  grids = np.stack([np_grids(boxes[v], grid_flips[v], 3, 3) for v in (0, 1)])
  expected, *_ = np_vicregl(
    z, maps, grids, alpha=0.75, num_matches=(20, 4), l2_all_matches=True, coeffs=COEFFS
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert state == {} and {"z_std", "z_offdiag_corr", "location_invariance"} <= set(metrics)
  if flip_grid:
    # Gradients flow through the gathered features (the matching indices carry none).
    loss_of_maps = lambda m: VICREGL.objective({**online, "local_projection": m}, None, {}, hp)[0]
    grad = np.asarray(jax.jit(jax.grad(loss_of_maps))(maps))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_vicregl_heads_shapes_and_declarations():
  hp = {**VICREGL.defaults, "proj_hidden_dim": 16, "proj_output_dim": 8}
  hp.update(local_proj_hidden_dim=12, local_proj_output_dim=6)
  module = VICREGL.heads(hp)
  features = {
    "embedding": jnp.asarray(random((4, 10), 7)),
    "layer4": jnp.asarray(random((4, 2, 3, 10), 8)),
  }
  variables = module.init(jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, train=True, mutable=["batch_stats"])
  assert out["projection"].shape == (4, 8) and out["local_projection"].shape == (4, 2, 3, 6)
  # As the official `utils.MLP`'s last layer: no bias in any Linear layer of either projector.
  dense = [k for k in flatten_dict(variables["params"]) if any("Dense" in part for part in k)]
  assert len(dense) == 6 and all(k[-1] == "kernel" for k in dense)
  assert VICREGL.features == ("layer4",) and VICREGL.name == "vicregl"
  assert VICREGL.defaults["alpha"] == 0.75 and VICREGL.defaults["num_matches"] == (20, 4)
  with pytest.raises(ValueError, match=r"\(4, 6, 10\)"):
    module.apply(variables, {**features, "layer4": jnp.zeros((4, 6, 10))}, train=False)


def test_vicregl_rejects_bad_shapes():
  z, maps, boxes, flips = vicregl_inputs(30)
  grids = np.zeros((6, 3, 3, 2), np.float32)
  with pytest.raises(ValueError, match=r"\(6, 3, 3, 5\).*\(6, 3, 2, 5\)"):
    vicreg.vicregl_loss(z[0], z[1], maps[0], maps[1][:, :, :2], grids, grids)
  with pytest.raises(ValueError, match=r"\(6, 3, 3, 5\).*\(6, 3, 2, 2\)"):
    vicreg.vicregl_loss(z[0], z[1], maps[0], maps[1], grids[:, :, :2], grids[:, :, :2])
  with pytest.raises(ValueError, match=r"\(6, 7\).*\(5, 7\)"):
    vicreg.vicregl_loss(z[0], z[1][:5], maps[0], maps[1], grids, grids)
  with pytest.raises(ValueError, match=r"\(4, 0\)"):
    vicreg.vicregl_loss(z[0], z[1], maps[0], maps[1], grids, grids, num_matches=(4, 0))
  with pytest.raises(ValueError, match=r"\(6, 3\).*\(6,\)"):
    vicreg.location_grid(jnp.asarray(boxes[0][:, :3]), jnp.asarray(flips[0]), height=2, width=2)
