"""MoCo v2 (a queue of momentum keys) and MoCo v3 (in-batch keys, a predictor).

- MoCo v2: Chen, Fan, Girshick and He 2020, "Improved Baselines with Momentum Contrastive
  Learning", arXiv:2003.04297, in solo-learn's symmetric "MoCo v2+" form
  (`solo/methods/mocov2plus.py`): one queue per view, the loss averaged over both directions.
  The official code is asymmetric and keeps one queue.
- MoCo v3: Chen, Xie and He 2021, "An Empirical Study of Training Self-Supervised Vision
  Transformers", arXiv:2104.02057: the sum of both directions of an in-batch InfoNCE, each
  scaled by 2τ as in the official code; ResNet heads with BatchNorm without affine on the
  projector's output and no biases.

Defaults follow solo-learn's CIFAR recipes (`scripts/pretrain/cifar/mocov2plus.yaml`,
`mocov3.yaml`) except MoCo v2's queue: 65,536 keys as in the MoCo papers, where solo-learn's
CIFAR recipe uses 32,768. Target momentum follows a cosine schedule from 0.99 to 0.999 (v2) and
from 0.99 to 1.0 (v3), as solo-learn's CIFAR recipes do; the MoCo papers keep 0.999 (v2) and
0.99 → 1 (v3).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP, ProjectionHeads

MOCOV2_DEFAULTS = {
  "proj_hidden_dim": 2048,
  "proj_output_dim": 256,
  "temperature": 0.2,
  "queue_size": 65536,
}
MOCOV3_DEFAULTS = {
  "proj_hidden_dim": 4096,
  "proj_output_dim": 256,
  "pred_hidden_dim": 4096,
  "temperature": 0.2,
}


# ---------------------------------------------------------------------------------------- MoCo v2


def mocov2_heads(hp: Mapping[str, Any]) -> nn.Module:
  """MoCo v2's projector: Linear → ReLU → Linear, no BatchNorm, no predictor."""
  return ProjectionHeads(
    projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"], use_bn=False)
  )


def moco_infonce(
  q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCo's InfoNCE of queries against their keys and a queue of negative keys.

  With `q̂`, `k̂` the L2-normalised rows, the logits of query i are
  `[⟨q̂_i, k̂_i⟩, ⟨q̂_i, queue_1⟩, …, ⟨q̂_i, queue_K⟩] / τ` and the loss is the mean over i of
  the cross-entropy with class 0 (the positive key). No gradient reaches `k` or `queue`.

  Args:
    q: `[n, d]` online queries.
    k: `[n, d]` keys from the momentum encoder (row i is query i's positive).
    queue: `[K, d]` negative keys, rows of unit norm.
    temperature: τ > 0.

  Returns:
    `(loss, metrics)`: the scalar loss and `contrastive_acc`, the fraction of queries whose
    positive key scores above every queued key.
  """
  if q.ndim != 2 or k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(
      f"moco_infonce expects q, k [n, d] and queue [K, d]; got {q.shape}, {k.shape}, {queue.shape}"
    )
  q = base.l2_normalize(q.astype(jnp.float32))
  k = jax.lax.stop_gradient(base.l2_normalize(k.astype(jnp.float32)))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  logits = jnp.concatenate([positive, q @ queue.T], axis=1) / temperature
  loss = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])
  return loss, {"contrastive_acc": jnp.mean(jnp.argmax(logits, axis=-1) == 0)}


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First-in first-out update of a ring buffer of keys.

  The `n` new keys overwrite the `n` oldest rows, `(ptr + j) mod K` for `j < n`, wrapping around
  the end of the buffer, and the pointer moves to `(ptr + n) mod K`, the next oldest row.

  Args:
    queue: `[..., K, d]` keys (leading axes, e.g. one queue per view, share the pointer).
    ptr: int32 scalar, the row of the oldest key.
    keys: `[..., n, d]` new keys, `n ≤ K`.

  Returns:
    `(queue, ptr)` updated.
  """
  size, n = queue.shape[-2], keys.shape[-2]
  if keys.ndim != queue.ndim or keys.shape[-1] != queue.shape[-1] or n > size:
    raise ValueError(
      f"enqueue expects keys [..., n ≤ K, d] for a queue [..., K, d]; got "
      f"keys {keys.shape}, queue {queue.shape}"
    )
  rows = (ptr + jnp.arange(n)) % size
  return queue.at[..., rows, :].set(keys.astype(queue.dtype)), (ptr + n) % size


def init_queue(hp: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """One queue per view of random unit vectors `[2, K, d]`, and the pointer 0."""
  shape = (2, hp["queue_size"], hp["proj_output_dim"])
  return {
    "queue": base.l2_normalize(jax.random.normal(key, shape, jnp.float32)),
    "ptr": jnp.zeros((), jnp.int32),
  }


def mocov2_objective(online, target, state, hp):
  """Symmetric MoCo v2 loss; the two views' normalised keys then enter their queues.

  `½ [L(q₁, k₂, queue₂) + L(q₂, k₁, queue₁)]`: each query is contrasted with the other view's
  key and with the queue holding earlier keys of that other view (solo-learn's MoCo v2+).
  """
  if target is None:
    raise ValueError("MoCo v2's objective needs the momentum encoder's outputs, got target=None")
  q1, q2 = base.split_views(online["projection"], "online['projection']")
  k1, k2 = base.split_views(target["projection"], "target['projection']")
  queue = state["queue"]
  if queue.shape[0] != 2:
    raise ValueError(f"MoCo v2 keeps one queue per view, [2, K, d]; got {queue.shape}")
  loss1, m1 = moco_infonce(q1, k2, queue[1], temperature=hp["temperature"])
  loss2, m2 = moco_infonce(q2, k1, queue[0], temperature=hp["temperature"])
  keys = jax.lax.stop_gradient(base.l2_normalize(jnp.stack([k1, k2]).astype(jnp.float32)))
  queue, ptr = enqueue(queue, state["ptr"], keys)
  metrics = jax.tree.map(lambda a, b: (a + b) / 2, m1, m2)
  metrics.update(base.collapse_metrics(jnp.concatenate([q1, q2])))
  return (loss1 + loss2) / 2, metrics, {"queue": queue, "ptr": ptr}


# ---------------------------------------------------------------------------------------- MoCo v3


def mocov3_heads(hp: Mapping[str, Any]) -> nn.Module:
  """MoCo v3's ResNet heads: projector Linear → BN → ReLU → Linear → BN (no affine) and
  predictor Linear → BN → ReLU → Linear, every Linear without bias."""
  d = hp["proj_output_dim"]
  return ProjectionHeads(
    projector=MLP((hp["proj_hidden_dim"],), d, use_bias=False, last_bn=True),
    predictor=MLP((hp["pred_hidden_dim"],), d, use_bias=False),
  )


def mocov3_loss(
  q: jax.Array, k: jax.Array, *, temperature: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MoCo v3's in-batch InfoNCE, scaled by 2τ.

  With `q̂`, `k̂` the L2-normalised rows, logits `⟨q̂_i, k̂_j⟩ / τ` `[n, n]`; the loss is
  `2τ · mean_i CE(logits_i, i)`: the other images' keys are the negatives. The 2τ factor of the
  official code keeps the gradient scale independent of τ. No gradient reaches `k`.

  Args:
    q: `[n, d]` online predictions.
    k: `[n, d]` momentum-encoder projections of the other view.
    temperature: τ > 0.

  Returns:
    `(loss, metrics)`: the scalar loss and `contrastive_acc`.
  """
  if q.ndim != 2 or k.shape != q.shape:
    raise ValueError(f"mocov3_loss expects q, k of one shape [n, d], got {q.shape}, {k.shape}")
  q = base.l2_normalize(q.astype(jnp.float32))
  k = jax.lax.stop_gradient(base.l2_normalize(k.astype(jnp.float32)))
  logits = q @ k.T / temperature
  loss = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))) * (2 * temperature)
  acc = jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(q.shape[0]))
  return loss, {"contrastive_acc": acc}


def mocov3_objective(online, target, state, hp):
  """`L(p₁, k₂) + L(p₂, k₁)`: online predictions against the other view's momentum keys."""
  if target is None:
    raise ValueError("MoCo v3's objective needs the momentum encoder's outputs, got target=None")
  p1, p2 = base.split_views(online["prediction"], "online['prediction']")
  k1, k2 = base.split_views(target["projection"], "target['projection']")
  loss1, m1 = mocov3_loss(p1, k2, temperature=hp["temperature"])
  loss2, m2 = mocov3_loss(p2, k1, temperature=hp["temperature"])
  metrics = jax.tree.map(lambda a, b: (a + b) / 2, m1, m2)
  z = online["projection"]
  metrics.update(base.collapse_metrics(z.reshape(-1, z.shape[-1])))
  return loss1 + loss2, metrics, state


METHODS = (
  base.Method(
    name="mocov2",
    heads=mocov2_heads,
    objective=mocov2_objective,
    defaults=MOCOV2_DEFAULTS,
    optimizer="sgd",
    recipe="mocov2",
    target_momentum=(0.99, 0.999),
    init_state=init_queue,
  ),
  base.Method(
    name="mocov3",
    heads=mocov3_heads,
    objective=mocov3_objective,
    defaults=MOCOV3_DEFAULTS,
    optimizer="lars",
    recipe="byol",
    target_momentum=(0.99, 1.0),
  ),
)
