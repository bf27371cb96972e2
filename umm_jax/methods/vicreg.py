"""VICReg: variance, invariance and covariance terms on the two views' embeddings (Bardes et
al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning",
arXiv:2105.04906), and VICRegL, its extension to local features (Bardes et al. 2022, "VICRegL:
Self-Supervised Learning of Local Visual Features", arXiv:2210.01571).

VICReg defaults follow solo-learn's CIFAR recipe (`scripts/pretrain/cifar/vicreg.yaml`):
projector Linear 2048 → BN → ReLU → Linear 2048 → BN → ReLU → Linear 2048, coefficients
25/25/1, LARS, BYOL's asymmetric augmentations.

The variance term: the paper sums the hinge `mean_j relu(γ − std_j)` of the two views; the
official code (`facebookresearch/vicreg`, `main_vicreg.py`) and solo-learn average them, which
halves the term. `variance_halving=True` (default) is the code's version, `False` the paper's.

VICRegL follows the official code (`facebookresearch/VICRegL`, `main_vicregl.py`, two crops as
its ResNet-50 command): `α · global + (1 − α) · local`, α = 0.75 (the code's default and the
README's training commands, ResNet-50 included; the README also releases α = 0.9 models, better
at classification, worse at segmentation). The global term is VICReg on the projections of the
pooled embeddings, with both the variance and the covariance terms averaged over the views (so
its covariance term is half of VICReg's). The local term is VICReg on `layer4` feature vectors
after a local projector applied at every location, matched across the views twice: by position
in the source image (each cell's nearest cell of the other view, from the crop boxes and flips;
keep the best `num_matches = (20, 4)` pairs) and by feature distance (each cell's nearest cell
in L2; all cells, `l2_all_matches`), both directions, averaged as the official code does.
Differences, all explicit:
- projectors: the official global projector is 8192-8192-8192; here VICReg's CIFAR widths
  (2048), the local one keeps the official 512-512-512 (`--maps-mlp`). As in the official
  `utils.MLP`, the last Linear layer has no bias; the hidden ones have none either, which is
  equivalent (BatchNorm follows them).
- positions are in fractions of the source image, the official code's in source pixels: the
  same ranking for square sources.
- `flip_grid=True` mirrors the grid of a flipped view, so a cell is matched to the cell that
  shows the same source point. The official default `--no-flip-grid 1` leaves the grid
  unflipped (`flip_grid=False` reproduces it).
- match counts are clamped to the number of cells (a 32 px CIFAR view has a 4 × 4 `layer4`).
- no `fast_vc_reg` variant, and no online classifier in the loss (the training loop has its own
  probe).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {
  "proj_hidden_dim": 2048,
  "proj_output_dim": 2048,
  "sim_coeff": 25.0,
  "std_coeff": 25.0,
  "cov_coeff": 1.0,
  "variance_halving": True,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """VICReg's 3-layer projector."""
  hidden = hp["proj_hidden_dim"]
  return ProjectionHeads(projector=MLP((hidden, hidden), hp["proj_output_dim"]))


def _check(z: jax.Array, fn: str) -> jax.Array:
  if z.ndim != 2 or z.shape[0] < 2:
    raise ValueError(f"{fn} expects embeddings [n, d] with n >= 2, got shape {z.shape}")
  return z.astype(jnp.float32)


def variance_loss(z: jax.Array, *, gamma: float = 1.0, eps: float = 1e-4) -> jax.Array:
  """`mean_j relu(γ − sqrt(Var_j + eps))` over the dimensions of `z` `[n, d]`.

  `Var_j` is the unbiased variance of dimension j over the batch (PyTorch's `var()`).
  """
  z = _check(z, "variance_loss")
  return jnp.mean(jax.nn.relu(gamma - jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)))


def invariance_loss(z1: jax.Array, z2: jax.Array) -> jax.Array:
  """Mean squared error between paired rows of `z1` and `z2` `[n, d]`."""
  if z1.shape != z2.shape:
    raise ValueError(f"invariance_loss expects two arrays of one shape, got {z1.shape}, {z2.shape}")
  return jnp.mean((z1.astype(jnp.float32) - z2.astype(jnp.float32)) ** 2)


def covariance_loss(z: jax.Array) -> jax.Array:
  """`Σ_{i≠j} C_ij² / d` with `C` the `(n − 1)`-normalised covariance of `z` `[n, d]`."""
  z = _check(z, "covariance_loss")
  n, d = z.shape
  zc = z - z.mean(axis=0)
  cov = zc.T @ zc / (n - 1)
  return (jnp.sum(cov**2) - jnp.sum(jnp.diagonal(cov) ** 2)) / d


def vicreg_loss(
  z1: jax.Array,
  z2: jax.Array,
  *,
  sim_coeff: float = 25.0,
  std_coeff: float = 25.0,
  cov_coeff: float = 1.0,
  variance_halving: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sim_coeff · MSE(z1, z2) + std_coeff · V + cov_coeff · (C(z1) + C(z2))`.

  `V = v(z1) + v(z2)` (the paper) or its half (the official code, `variance_halving=True`),
  `v` = `variance_loss`, `C` = `covariance_loss`.

  Args:
    z1: `[n, d]` embeddings of the first view; row i of both inputs comes from image i.
    z2: `[n, d]` embeddings of the second view.
    sim_coeff, std_coeff, cov_coeff: the three weights (λ, μ, ν in the paper).
    variance_halving: average rather than sum the two views' variance terms.

  Returns:
    `(loss, metrics)` with the unweighted `invariance`, `variance` and `covariance` terms.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
      f"vicreg_loss expects two [n, d] arrays of one shape, got {z1.shape}, {z2.shape}"
    )
  inv = invariance_loss(z1, z2)
  var = variance_loss(z1) + variance_loss(z2)
  if variance_halving:
    var = var / 2
  cov = covariance_loss(z1) + covariance_loss(z2)
  loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
  return loss, {"invariance": inv, "variance": var, "covariance": cov}


def loss_from_hp(z1: jax.Array, z2: jax.Array, hp: Mapping[str, Any]):
  """`vicreg_loss` with the coefficients read from the method's hyper-parameters."""
  keys = ("sim_coeff", "std_coeff", "cov_coeff", "variance_halving")
  return vicreg_loss(z1, z2, **{k: hp[k] for k in keys})


def objective(online, target, state, hp):
  """VICReg between the two views' projections; no target, no state."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  loss, metrics = loss_from_hp(z1, z2, hp)
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


# ---------------------------------------------------------------------------------------------
# VICRegL: VICReg on the pooled embeddings plus VICReg on matched local feature vectors.
# ---------------------------------------------------------------------------------------------

VICREGL_DEFAULTS = {
  "proj_hidden_dim": 2048,
  "proj_output_dim": 2048,
  "local_proj_hidden_dim": 512,
  "local_proj_output_dim": 512,
  "sim_coeff": 25.0,
  "std_coeff": 25.0,
  "cov_coeff": 1.0,
  "alpha": 0.75,
  "num_matches": (20, 4),
  "l2_all_matches": True,
  "flip_grid": True,
}


class VICRegLHeads(nn.Module):
  """VICRegL's global projector on `embedding` and local projector on every `layer4` location.

  `__call__(features, train=...)` reads `embedding` `[N, D]` and `layer4` `[N, h, w, c]` and
  returns `projection` `[N, d]` and `local_projection` `[N, h, w, d_l]`. The local projector
  sees the `N·h·w` locations as one batch (its BatchNorm statistics cover all of them), as the
  official code's `maps_projector(maps.flatten(0, 1))`.
  """

  projector: nn.Module
  local_projector: nn.Module

  def __call__(self, features: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
    maps = features["layer4"]
    if maps.ndim != 4:
      raise ValueError(f"VICRegL's local projector expects layer4 [N, h, w, c], got {maps.shape}")
    n, h, w, c = maps.shape
    local = self.local_projector(maps.reshape(n * h * w, c), train=train)
    return {
      "projection": self.projector(features["embedding"], train=train),
      "local_projection": local.reshape(n, h, w, -1),
    }


def vicregl_heads(hp: Mapping[str, Any]) -> nn.Module:
  """Two 3-layer projectors with no bias in any Linear layer (see the module docstring)."""
  hidden, local_hidden = hp["proj_hidden_dim"], hp["local_proj_hidden_dim"]
  return VICRegLHeads(
    projector=MLP((hidden, hidden), hp["proj_output_dim"], use_bias=False),
    local_projector=MLP((local_hidden, local_hidden), hp["local_proj_output_dim"], use_bias=False),
  )


def location_grid(box: jax.Array, flip: jax.Array, *, height: int, width: int) -> jax.Array:
  """Source-image position `(y, x)` of every cell centre of a `height × width` map of each view.

  Cell `(r, c)` of a view cropped at `box` `(y0, x0, h, w)` sits at
  `(y0 + h (r + 0.5) / height, x0 + w (c' + 0.5) / width)`, `c' = width − 1 − c` for a flipped
  view (`umm_jax.augment.two_views`' convention at the map's resolution); the official
  `_location_to_NxN_grid` with `flip=True`.

  Args:
    box: `[n, 4]` crop boxes in fractions of the source image.
    flip: `[n]` bool, the view was mirrored left-right after cropping.
    height, width: the map's spatial size.

  Returns:
    `[n, height, width, 2]` float32 positions in fractions of the source image.
  """
  if box.ndim != 2 or box.shape[-1] != 4 or flip.shape != box.shape[:1]:
    raise ValueError(
      f"location_grid expects box [n, 4] and flip [n], got {box.shape}, {flip.shape}"
    )
  box = box.astype(jnp.float32)
  rows = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  cols = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  # A flipped view's column c shows column width − 1 − c: (width − c − 0.5) / width = 1 − cols.
  cols = jnp.where(flip[:, None], 1.0 - cols, cols)
  y = box[:, 0, None] + box[:, 2, None] * rows  # [n, height]
  x = box[:, 1, None] + box[:, 3, None] * cols  # [n, width]
  shape = (box.shape[0], height, width)
  return jnp.stack(
    [jnp.broadcast_to(y[:, :, None], shape), jnp.broadcast_to(x[:, None], shape)], -1
  )


def _squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """`[n, q, c]`, `[n, p, c]` → `[n, q, p]` squared Euclidean distances, without gradient.

  Only their order is used; the Gram form avoids the `[n, q, p, c]` difference tensor.
  """
  a, b = jax.lax.stop_gradient(a.astype(jnp.float32)), jax.lax.stop_gradient(b.astype(jnp.float32))
  gram = jnp.einsum("nqc,npc->nqp", a, b, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(a**2, -1)[:, :, None] + jnp.sum(b**2, -1)[:, None, :] - 2 * gram


def nearest_neighbors(distances: jax.Array, num_matches: int) -> tuple[jax.Array, jax.Array]:
  """The `num_matches` queries closest to their nearest candidate, and that candidate.

  For every query `i` of `distances` `[n, q, p]` its nearest candidate `j(i) = argmin_j d_ij`;
  the `k = min(num_matches, q)` queries with the smallest `d_{i j(i)}` are kept (ties: the lower
  index), listed in increasing query index as the official `neirest_neighbores`' masked select.

  Returns:
    `(query_index, candidate_index)`, both `[n, k]` int32.
  """
  if distances.ndim != 3:
    raise ValueError(f"nearest_neighbors expects distances [n, q, p], got shape {distances.shape}")
  k = min(num_matches, distances.shape[1])
  nearest = jnp.argmin(distances, axis=-1)
  _, query = jax.lax.top_k(-jnp.min(distances, axis=-1), k)
  query = jnp.sort(query, axis=-1)
  return query, jnp.take_along_axis(nearest, query, axis=-1)


def _gather(maps: jax.Array, index: jax.Array) -> jax.Array:
  """`maps` `[n, q, c]` at `index` `[n, k]` → `[n, k, c]`."""
  return jnp.take_along_axis(maps, index[..., None], axis=1)


def matched_vicreg_terms(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Unweighted VICReg terms of matched local features `x`, `y` `[n, k, c]` (row i: image i).

  As the official `_vicreg_loss`: invariance is the MSE over all entries; variance and covariance
  are taken over the batch separately for each match slot `k` and averaged over the slots, and
  the two inputs' variance and covariance terms are averaged.
  """
  if x.ndim != 3 or x.shape != y.shape:
    raise ValueError(f"matched_vicreg_terms expects two [n, k, c] arrays, got {x.shape}, {y.shape}")
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  per_slot = lambda fn, z: jnp.mean(jax.vmap(fn, in_axes=1)(z))
  inv = jnp.mean((x - y) ** 2)
  var = (per_slot(variance_loss, x) + per_slot(variance_loss, y)) / 2
  cov = (per_slot(covariance_loss, x) + per_slot(covariance_loss, y)) / 2
  return inv, var, cov


def _matched_terms(maps1, maps2, distances, counts):
  """Mean of `matched_vicreg_terms` over both directions and every match count in `counts`."""
  terms = []
  # Equal counts (after clamping) give equal terms: computing one of them keeps the same mean.
  for k in sorted({min(k, maps1.shape[1]) for k in counts}):
    for a, b, d in ((maps1, maps2, distances), (maps2, maps1, jnp.swapaxes(distances, 1, 2))):
      query, candidate = nearest_neighbors(d, k)
      terms.append(matched_vicreg_terms(_gather(a, query), _gather(b, candidate)))
  return tuple(jnp.mean(jnp.stack(t)) for t in zip(*terms, strict=True))


def vicregl_local_terms(
  maps1: jax.Array,
  maps2: jax.Array,
  grid1: jax.Array,
  grid2: jax.Array,
  *,
  num_matches: tuple[int, int] = (20, 4),
  l2_all_matches: bool = True,
) -> dict[str, jax.Array]:
  """Unweighted local VICReg terms of two views' feature maps, matched two ways.

  - by location: each cell's nearest cell of the other view in the source image (`grid`);
  - by feature: each cell's nearest cell of the other view in feature space (L2).
  Each matching keeps the best `num_matches[0]` and, separately, `num_matches[1]` pairs (the
  official code's first and second search; both views get both counts over its two view
  orders), in both directions, and averages their `matched_vicreg_terms`. With
  `l2_all_matches` (the official default) the feature matching keeps every cell. Counts are
  clamped to the number of cells.

  Args:
    maps1, maps2: `[n, h, w, c]` local projections of the two views.
    grid1, grid2: `[n, h, w, 2]` source positions of their cells (`location_grid`).
    num_matches: the two match counts.
    l2_all_matches: keep every cell in the feature matching.

  Returns:
    `{'l2_invariance', 'l2_variance', 'l2_covariance', 'location_invariance', ...}`.
  """
  if maps1.ndim != 4 or maps1.shape != maps2.shape:
    raise ValueError(
      f"VICRegL expects two [n, h, w, c] maps of one shape, got {maps1.shape}, {maps2.shape}"
    )
  if grid1.shape != (*maps1.shape[:3], 2) or grid2.shape != grid1.shape:
    raise ValueError(
      f"VICRegL expects grids [n, h, w, 2] matching maps {maps1.shape}, got {grid1.shape}, "
      f"{grid2.shape}"
    )
  if len(num_matches) != 2 or min(num_matches) < 1:
    raise ValueError(f"VICRegL's num_matches must be two positive counts, got {num_matches}")
  n, h, w, c = maps1.shape
  flat1, flat2 = maps1.reshape(n, h * w, c), maps2.reshape(n, h * w, c)
  loc1, loc2 = grid1.reshape(n, h * w, 2), grid2.reshape(n, h * w, 2)
  l2_counts = (h * w, h * w) if l2_all_matches else tuple(num_matches)
  terms = {}
  for name, distances, counts in (
    ("l2", _squared_distances(flat1, flat2), l2_counts),
    ("location", _squared_distances(loc1, loc2), tuple(num_matches)),
  ):
    inv, var, cov = _matched_terms(flat1, flat2, distances, counts)
    terms.update({f"{name}_invariance": inv, f"{name}_variance": var, f"{name}_covariance": cov})
  return terms


def vicregl_loss(
  z1: jax.Array,
  z2: jax.Array,
  maps1: jax.Array,
  maps2: jax.Array,
  grid1: jax.Array,
  grid2: jax.Array,
  *,
  alpha: float = 0.75,
  sim_coeff: float = 25.0,
  std_coeff: float = 25.0,
  cov_coeff: float = 1.0,
  num_matches: tuple[int, int] = (20, 4),
  l2_all_matches: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`α · global + (1 − α) · local`, the VICRegL objective of two views.

  `global = sim_coeff · MSE(z1, z2) + std_coeff · (v(z1) + v(z2)) / 2 + cov_coeff ·
  (C(z1) + C(z2)) / 2` (the official `global_loss` averages both terms over the views, so its
  covariance term is half of VICReg's); `local` is the same weighting of the sums of the
  feature-matched and location-matched terms of `vicregl_local_terms`.

  Args:
    z1, z2: `[n, d]` global projections of the two views.
    maps1, maps2: `[n, h, w, c]` local projections.
    grid1, grid2: `[n, h, w, 2]` source positions of the map cells (`location_grid`).
    alpha: weight of the global term.
    sim_coeff, std_coeff, cov_coeff: the VICReg weights, shared by both terms.
    num_matches, l2_all_matches: see `vicregl_local_terms`.

  Returns:
    `(loss, metrics)`: the unweighted global terms, the local terms, and both weighted losses.
  """
  if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] != maps1.shape[0]:
    raise ValueError(
      f"vicregl_loss expects z1, z2 [n, d] of one shape with n = maps' n, got {z1.shape}, "
      f"{z2.shape}, maps {maps1.shape}"
    )
  inv = invariance_loss(z1, z2)
  var = (variance_loss(z1) + variance_loss(z2)) / 2
  cov = (covariance_loss(z1) + covariance_loss(z2)) / 2
  global_loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
  local = vicregl_local_terms(
    maps1, maps2, grid1, grid2, num_matches=num_matches, l2_all_matches=l2_all_matches
  )
  local_loss = sum(
    coeff * (local[f"l2_{term}"] + local[f"location_{term}"])
    for coeff, term in (
      (sim_coeff, "invariance"),
      (std_coeff, "variance"),
      (cov_coeff, "covariance"),
    )
  )
  loss = alpha * global_loss + (1 - alpha) * local_loss
  metrics = {"invariance": inv, "variance": var, "covariance": cov, **local}
  return loss, {**metrics, "global_loss": global_loss, "local_loss": local_loss}


def vicregl_objective(online, target, state, hp):
  """VICRegL between the two views' projections and local projections; no target, no state."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  maps1, maps2 = base.split_views(online["local_projection"], "online['local_projection']")
  if maps1.ndim != 4:
    raise ValueError(
      f"online['local_projection'] must be [2, n, h, w, c], got {online['local_projection'].shape}"
    )
  _, h, w, _ = maps1.shape
  box, flip = online["box"], online["flip"]
  if not hp["flip_grid"]:
    flip = jnp.zeros_like(flip)
  grid1, grid2 = (location_grid(box[v], flip[v], height=h, width=w) for v in (0, 1))
  keys = ("alpha", "sim_coeff", "std_coeff", "cov_coeff", "num_matches", "l2_all_matches")
  loss, metrics = vicregl_loss(z1, z2, maps1, maps2, grid1, grid2, **{k: hp[k] for k in keys})
  return loss, {**metrics, **base.collapse_metrics(jnp.concatenate([z1, z2]))}, state


METHODS = (
  base.Method(
    name="vicreg",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="byol",
  ),
  base.Method(
    name="vicregl",
    heads=vicregl_heads,
    objective=vicregl_objective,
    defaults=VICREGL_DEFAULTS,
    optimizer="lars",
    recipe="byol",
    features=("layer4",),
  ),
)
