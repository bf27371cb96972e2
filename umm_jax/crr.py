"""Coding rate, compressed rate and rate reduction (MCR², ReduNet), with group memberships.

Samples are ROWS: a feature matrix `Z` is `[m, d]` (`m` samples in `R^d`), the transpose of
the papers' `d × m` convention. Logarithms are natural. `eps2` is ε² (the squared distortion,
which reference code often calls "eps"). With `Π_j = diag(P[:, j])` and `t_j = Σ_i P[i, j]`:

- coding rate        `R(Z)   = ½ · logdet(I_d + d/(m ε²) · Zᵀ Z)`
- compressed rate    `R^c(Z) = Σ_j t_j/(2m) · logdet(I_d + d/(t_j ε²) · Zᵀ Π_j Z)`,
  a group with `t_j = 0` contributing 0
- rate reduction     `ΔR = R − R^c` (larger is better)

References: Yu et al., "Learning Diverse and Discriminative Representations via the Principle of
Maximal Coding Rate Reduction" (NeurIPS 2020); Chan et al., "ReduNet" (JMLR 2022); the UMM paper
(arXiv 2410.00772), Sec. 4.2 and App. C, for the self-supervised memberships. The project's
reading is `shared/spec/umm-math.md`, section 2.

Every log-determinant is computed by a Cholesky factorisation of a matrix `I + (PSD)`, whose
eigenvalues are at least 1, on whichever side costs fewer flops:
`logdet(I_d + c Zᵀ D Z) = logdet(I_m + c D^½ Z Zᵀ D^½)`. The sample side reuses one Gram matrix
`Z Zᵀ` for every group, so it wins unless `d` is well below `m`. Groups are processed
`group_block` at a time in one sequential loop, which bounds memory at `group_block` matrices of
size `m × m` or `d × d` (a whole soft membership at `m = 512` would need 512³ floats = 512 MB).

One loop, never two side by side: jaxlib 0.10's CPU LAPACK kernels spread a batch over XLA's
intra-op thread pool and block until it is done, so two batched factorisations in flight at
once can deadlock a 2-thread pool (seen on a 2-core machine). Callers should likewise compute
several ΔR in one jitted function with `vmap` or in separate calls, not as independent branches.

All functions are pure, jit-able and differentiable with respect to `Z`; memberships act as
labels and carry no gradient. Computation is float32 (float64 inputs stay float64).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

MEMBERSHIPS = ("soft", "instance", "labels")

# On a 2-core CPU, blocks of 8 to 64 groups run within 10% of each other at m = d = 512; 16 keeps
# the working set at 16 matrices (16 MB at m = 512). Accelerators gain from larger blocks.
DEFAULT_GROUP_BLOCK = 16

_HIGHEST = jax.lax.Precision.HIGHEST


class RateReduction(NamedTuple):
  """Rate reduction and its two terms, each a scalar (or `[...]` under `vmap`).

  Attributes:
    delta: `ΔR = R − R^c`.
    rate: the coding rate `R` of all samples.
    compressed: the compressed rate `R^c` given the membership.
  """

  delta: jax.Array
  rate: jax.Array
  compressed: jax.Array


def _features(z: jax.Array, fn: str) -> jax.Array:
  if z.ndim != 2:
    raise ValueError(f"{fn} expects features Z of shape [m, d] (samples as rows), got {z.shape}")
  # Cholesky in bfloat16/float16 is unreliable; float64 is kept for finite-difference checks.
  return z.astype(jnp.promote_types(z.dtype, jnp.float32))


def _unit_rows(z: jax.Array) -> jax.Array:
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _logdet_pd(a: jax.Array) -> jax.Array:
  """`logdet(a)` of a symmetric positive-definite `[..., s, s]` matrix via Cholesky."""
  chol = jnp.linalg.cholesky(a)
  return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def _sample_side_is_cheaper(m: int, d: int, k: int) -> bool:
  """Flop counts of the two sides for `k` groups (Cholesky `s³/3`, products `2·m·d·s`)."""
  sample_side = 2 * m * m * d + k * (m**3 / 3 + 3 * m * m)
  feature_side = k * (2 * m * d * d + d**3 / 3)
  return sample_side <= feature_side


def _serial_map(f, xs, block: int):
  """`vmap(f)` over the leading axis of the pytree `xs`, `block` rows per step of one loop.

  `lax.map(batch_size=...)` computes the remainder beside its loop, where its factorisations
  could run concurrently with the loop's (see the module docstring); instead the rows are padded
  to whole steps with copies of the last row, which keeps every value finite.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  steps = -(-n // block)
  block = -(-n // steps)

  def to_steps(x):
    x = jnp.concatenate([x, jnp.repeat(x[-1:], steps * block - n, axis=0)])
    return x.reshape(steps, block, *x.shape[1:])

  ys = jax.lax.map(jax.vmap(f), jax.tree.map(to_steps, xs))
  return jax.tree.map(lambda y: y.reshape(steps * block, *y.shape[2:])[:n], ys)


def _group_logdets(z: jax.Array, q: jax.Array, *, eps2: float, group_block: int) -> jax.Array:
  """`[k]` values `logdet(I_d + d/ε² · Zᵀ diag(q[:, j]) Z)` for `z` `[m, d]`, `q` `[m, k]`."""
  m, d = z.shape
  scale = d / eps2
  if _sample_side_is_cheaper(m, d, q.shape[1]):
    # HIGHEST: accelerators otherwise round float32 matmuls to bf16/tf32, far too coarse here.
    gram = scale * jnp.matmul(z, z.T, precision=_HIGHEST)
    eye = jnp.eye(m, dtype=z.dtype)

    def one_group(qj):
      root = jnp.sqrt(qj)
      return _logdet_pd(eye + root[:, None] * gram * root[None, :])
  else:
    eye = jnp.eye(d, dtype=z.dtype)

    def one_group(qj):
      return _logdet_pd(eye + scale * jnp.matmul(z.T * qj, z, precision=_HIGHEST))

  return _serial_map(one_group, q.T, group_block)


def _groups(membership: jax.Array, z: jax.Array, fn: str) -> tuple[jax.Array, jax.Array]:
  """Per-group sample weights `q = P[:, j] / t_j` `[m, k]` and rate weights `t_j/(2m)` `[k]`."""
  if membership.ndim != 2 or membership.shape[0] != z.shape[0]:
    raise ValueError(
      f"{fn} expects membership [m, k] with m = {z.shape[0]} rows to match Z {z.shape}, got "
      f"{membership.shape}"
    )
  p = jax.lax.stop_gradient(membership.astype(z.dtype))
  t = p.sum(axis=0)
  nonempty = t > jnp.finfo(z.dtype).tiny
  # A safe denominator keeps both branches finite, so the masked gradient stays finite too.
  q = p / jnp.where(nonempty, t, 1.0)
  return q, jnp.where(nonempty, t / (2 * z.shape[0]), 0.0)


def coding_rate(z: jax.Array, *, eps2: float = 0.5) -> jax.Array:
  """Coding rate `R(Z, ε) = ½ · logdet(I_d + d/(m ε²) · Zᵀ Z)` of `Z` `[m, d]` (rows = samples).

  `Z` is used as given (no normalisation; `rate_reduction` normalises). `eps2` is ε². Natural log.
  Returns a scalar. Reference: Yu et al. 2020 (MCR²), Eq. 2.
  """
  z = _features(z, "coding_rate")
  m = z.shape[0]
  uniform = jnp.full((m, 1), 1.0 / m, z.dtype)
  return 0.5 * _group_logdets(z, uniform, eps2=eps2, group_block=1)[0]


def compressed_rate(
  z: jax.Array,
  membership: jax.Array,
  *,
  eps2: float = 0.5,
  group_block: int = DEFAULT_GROUP_BLOCK,
) -> jax.Array:
  """Compressed rate `R^c(Z, ε | P)` of `Z` `[m, d]` (rows = samples) split by `P` `[m, k]`.

  `R^c = Σ_j t_j/(2m) · logdet(I_d + d/(t_j ε²) · Zᵀ diag(P[:, j]) Z)` with `t_j = Σ_i P[i, j]`;
  groups with `t_j` below the smallest normal float contribute exactly 0, with a finite gradient.
  `Z` is used as given; `eps2` is ε²; natural log. `P` is treated as labels: no gradient flows
  into it. `group_block` groups are factorised at a time (memory vs. speed). Returns a scalar.
  Reference: Yu et al. 2020 (MCR²), Eq. 3.
  """
  z = _features(z, "compressed_rate")
  q, weights = _groups(membership, z, "compressed_rate")
  return jnp.sum(weights * _group_logdets(z, q, eps2=eps2, group_block=group_block))


def rate_reduction(
  z: jax.Array,
  membership: jax.Array,
  *,
  eps2: float = 0.5,
  normalize: bool = True,
  group_block: int = DEFAULT_GROUP_BLOCK,
) -> RateReduction:
  """Rate reduction `ΔR = R(Z) − R^c(Z | P)` of features `Z` `[m, d]` (rows are samples).

  `R = ½ · logdet(I_d + d/(m ε²) · Zᵀ Z)` and
  `R^c = Σ_j t_j/(2m) · logdet(I_d + d/(t_j ε²) · Zᵀ diag(P[:, j]) Z)`, `t_j = Σ_i P[i, j]`,
  natural log (Yu et al. 2020, MCR²; the UMM paper, arXiv 2410.00772, Sec. 4.2).

  Args:
    z: features `[m, d]`, one sample per ROW (the papers write samples as columns).
    membership: row-stochastic `[m, k]`, `P[i, j]` = probability that sample `i` is in group
      `j`; build it with `soft_membership`, `instance_membership`, `label_membership` or
      `make_membership`. Treated as labels: no gradient flows into it.
    eps2: ε², the squared distortion (default 0.5).
    normalize: L2-normalise every sample (row) first.
    group_block: groups factorised at a time; bounds memory at `group_block` Gram matrices.

  Returns:
    `RateReduction(delta, rate, compressed)`, float32 scalars; `jax.vmap` over a leading axis
    of `z` (and `membership`) gives one value per feature set.

  Example:
    >>> import jax.numpy as jnp
    >>> from umm_jax import crr
    >>> z = jnp.eye(4)  # four samples (rows) in R^4
    >>> p = crr.label_membership(jnp.array([0, 0, 1, 1]), num_classes=2)
    >>> out = crr.rate_reduction(z, p, eps2=0.5)
    >>> print(f"dR={out.delta:.4f} R={out.rate:.4f} Rc={out.compressed:.4f}")
    dR=0.5878 R=2.1972 Rc=1.6094
    >>> soft = crr.rate_reduction(z, crr.soft_membership(z, temperature=0.1))
    >>> print(f"{soft.compressed:.4f}")  # 4 groups of 3 orthogonal samples: 3/2 · ln(11/3)
    1.9489
  """
  z = _features(z, "rate_reduction")
  if normalize:
    z = _unit_rows(z)
  q, weights = _groups(membership, z, "rate_reduction")
  # R is the logdet of one group holding every sample with weight 1/m; it joins the groups'
  # loop so that no second factorisation runs beside it (see the module docstring).
  uniform = jnp.full((z.shape[0], 1), 1.0 / z.shape[0], z.dtype)
  logdets = _group_logdets(
    z, jnp.concatenate([uniform, q], axis=1), eps2=eps2, group_block=group_block
  )
  rate = 0.5 * logdets[0]
  compressed = jnp.sum(weights * logdets[1:])
  return RateReduction(rate - compressed, rate, compressed)


def soft_membership(z: jax.Array, *, temperature: float = 0.1) -> jax.Array:
  """Soft membership `[m, m]` of `Z` `[m, d]` (rows = samples): every sample anchors a group.

  `P[i, j] = exp(s_ij/τ) / Σ_{l≠i} exp(s_il/τ)` for `j ≠ i` and `P[i, i] = 0`, with `s_ij` the
  cosine similarity of samples `i` and `j` and `τ = temperature`. Gradients are stopped: the
  membership plays the role of labels (UMM paper, Sec. 4.2 and App. C).
  """
  z = jax.lax.stop_gradient(_features(z, "soft_membership"))
  if z.shape[0] < 2:
    raise ValueError(f"soft_membership needs at least 2 samples, got Z {z.shape}")
  unit = _unit_rows(z)
  logits = jnp.matmul(unit, unit.T, precision=_HIGHEST) / temperature
  logits = jnp.where(jnp.eye(z.shape[0], dtype=bool), -jnp.inf, logits)
  return jax.nn.softmax(logits, axis=-1)


def instance_membership(n: int) -> jax.Array:
  """Hard membership `[2n, n]` of the `m = 2n` views of `n` images: image `i` is group `i`.

  Views are ordered `[view 1 of all n images; view 2 of all n images]`, so sample `v·n + i` is
  view `v` of image `i` and `P[v·n + i, i] = 1` (the UMM authors' code).
  """
  if n < 1:
    raise ValueError(f"instance_membership needs n >= 1 images, got {n}")
  return jnp.tile(jnp.eye(n, dtype=jnp.float32), (2, 1))


def label_membership(labels: jax.Array, num_classes: int) -> jax.Array:
  """One-hot membership `[m, num_classes]` from integer labels `[m]` (classic MCR²).

  Labels outside `[0, num_classes)` give an all-zero row (the sample joins no group).
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
      f"label_membership expects integer labels of shape [m], got {labels.dtype} {labels.shape}"
    )
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _check_labels(labels: jax.Array, count: int, z_shape: tuple[int, ...]) -> None:
  if labels.shape != (count,):
    raise ValueError(f"labels {labels.shape} do not match Z {z_shape}; expected ({count},)")


def make_membership(
  kind: str,
  z: jax.Array,
  *,
  temperature: float = 0.1,
  labels: jax.Array | None = None,
  num_classes: int | None = None,
) -> jax.Array:
  """Membership `[m, k]` of kind 'soft', 'instance' or 'labels' for features `Z` `[m, d]`.

  'soft': `soft_membership(Z, temperature=...)`, `k = m`. 'instance': `instance_membership(m//2)`,
  rows ordered `[view 1 of all images; view 2 of all images]`. 'labels':
  `label_membership(labels, num_classes)`, `labels` `[m]`.
  """
  if z.ndim != 2:
    raise ValueError(f"make_membership expects features Z [m, d], got {z.shape}")
  m = z.shape[0]
  if kind == "soft":
    return soft_membership(z, temperature=temperature)
  if kind == "instance":
    if m % 2:
      raise ValueError(f"'instance' membership needs an even number of views, got Z {z.shape}")
    return instance_membership(m // 2)
  if kind == "labels":
    if labels is None or num_classes is None:
      raise ValueError("'labels' membership needs labels [m] and num_classes")
    _check_labels(labels, m, z.shape)
    return label_membership(labels, num_classes)
  raise ValueError(f"Unknown membership kind {kind!r}; valid kinds: {', '.join(MEMBERSHIPS)}")


def _chunk_views(
  z: jax.Array, labels: jax.Array | None, chunk_size: int
) -> tuple[jax.Array, jax.Array | None]:
  """`[2, n, d]` views (and `[n]` labels) to `[c, chunk_size, d]` chunks ordered [v1; v2]."""
  if z.shape[0] != 2 or chunk_size % 2:
    raise ValueError(
      f"dataset_rate_reduction expects two views [2, n, d] and an even chunk_size, got Z "
      f"{z.shape} and chunk_size={chunk_size}"
    )
  half = chunk_size // 2
  c, d = z.shape[1] // half, z.shape[2]
  if c == 0:
    raise ValueError(f"Z {z.shape} holds fewer than chunk_size/2 = {half} images")
  chunks = z[:, : c * half].reshape(2, c, half, d).swapaxes(0, 1).reshape(c, chunk_size, d)
  if labels is not None:
    _check_labels(labels, z.shape[1], z.shape)
    labels = jnp.tile(labels[: c * half].reshape(c, half), (1, 2))
  return chunks, labels


def _chunk_rows(
  z: jax.Array, labels: jax.Array | None, chunk_size: int
) -> tuple[jax.Array, jax.Array | None]:
  """`[N, d]` rows (and `[N]` labels) to `[c, chunk_size, d]` consecutive chunks."""
  c, d = z.shape[0] // chunk_size, z.shape[1]
  if c == 0:
    raise ValueError(f"Z {z.shape} holds fewer than chunk_size = {chunk_size} rows")
  chunks = z[: c * chunk_size].reshape(c, chunk_size, d)
  if labels is not None:
    _check_labels(labels, z.shape[0], z.shape)
    labels = labels[: c * chunk_size].reshape(c, chunk_size)
  return chunks, labels


def dataset_rate_reduction(
  z: jax.Array,
  *,
  chunk_size: int,
  membership: str = "soft",
  eps2: float = 0.5,
  normalize: bool = True,
  temperature: float = 0.1,
  labels: jax.Array | None = None,
  num_classes: int | None = None,
  batch_size: int | None = None,
  group_block: int = DEFAULT_GROUP_BLOCK,
) -> RateReduction:
  """Mean of `rate_reduction` over chunks of `chunk_size` samples of a large feature set.

  `rate_reduction` is not additive over samples (it depends on `m`), so the monitor evaluates it
  on chunks of `m = chunk_size` views and averages the chunks (spec section 2). Chunks run in one
  sequential loop, `batch_size` of them vmapped per step, so memory stays at `batch_size` chunks'
  worth whatever the data set size.

  Args:
    z: either `[N, d]` samples as rows, cut into consecutive chunks; or `[2, n, d]`, two views of
      `n` images, each chunk then holding both views of `chunk_size/2` consecutive images ordered
      `[view 1 of its images; view 2 of its images]` (the order `instance_membership` expects).
      Trailing samples that do not fill a chunk are dropped: a smaller chunk has a different `m`
      and so a ΔR on another scale.
    chunk_size: samples (views) per chunk, `m`; even for `[2, n, d]` input.
    membership: 'soft', 'instance' (needs `[2, n, d]` input) or 'labels' (needs `labels`: `[N]`
      for `[N, d]` input, one label per image `[n]` for `[2, n, d]` input, and `num_classes`).
    eps2: ε², the squared distortion.
    normalize: L2-normalise every sample first.
    temperature: τ of the soft membership.
    labels: integer class labels, for `membership='labels'`.
    num_classes: number of classes, for `membership='labels'`.
    batch_size: chunks processed together per step; `None` is one at a time. The chunks are
      padded to whole steps by repeating the last one, so keep `batch_size` small.
    group_block: groups factorised at a time within a chunk.

  Returns:
    `RateReduction` of the means over chunks of ΔR, R and R^c.
  """
  if membership not in MEMBERSHIPS:
    raise ValueError(
      f"Unknown membership kind {membership!r}; valid kinds: {', '.join(MEMBERSHIPS)}"
    )
  if z.ndim == 3:
    chunks, chunk_labels = _chunk_views(z, labels, chunk_size)
  elif z.ndim == 2 and membership != "instance":
    chunks, chunk_labels = _chunk_rows(z, labels, chunk_size)
  else:
    raise ValueError(
      f"dataset_rate_reduction expects Z [N, d] or two views [2, n, d] ('instance' needs the "
      f"latter), got {z.shape} with membership={membership!r}"
    )
  if membership == "labels" and (chunk_labels is None or num_classes is None):
    raise ValueError("membership='labels' needs labels and num_classes")

  def one_chunk(xs):
    zc, lc = xs if chunk_labels is not None else (xs, None)
    p = make_membership(membership, zc, temperature=temperature, labels=lc, num_classes=num_classes)
    return rate_reduction(zc, p, eps2=eps2, normalize=normalize, group_block=group_block)

  xs = chunks if chunk_labels is None else (chunks, chunk_labels)
  per_chunk = _serial_map(one_chunk, xs, batch_size or 1)
  return RateReduction(*(jnp.mean(v) for v in per_chunk))
