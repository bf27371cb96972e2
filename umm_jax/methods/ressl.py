"""ReSSL: relational self-supervised learning (Zheng, Wang, You, Qian, Zhang, Wang and Xu 2021,
"ReSSL: Relational Self-Supervised Learning with Weak Augmentation", NeurIPS 2021,
arXiv:2107.09282).

The student sees the strong view (view 1 of the 'ressl' recipe), the EMA teacher the weak one
(view 2: crop and flip only). Both are compared with a queue of earlier teacher embeddings; the
teacher's similarities, sharpened by a low temperature τ_t, are the target distribution of the
student's, at τ_s:

  `p_t(j) = softmax_j(⟨k̂, u_j⟩ / τ_t)`, `p_s(j) = softmax_j(⟨q̂, u_j⟩ / τ_s)`,
  `L = mean_i −Σ_j p_t(j) log p_s(j)`

over the queue's unit vectors `u_j`; then the teacher's normalised embeddings enter the queue.
One direction only (strong → weak), as the official code and solo-learn (`solo/losses/ressl.py`,
`solo/methods/ressl.py`) do. Defaults: solo-learn's — projector Linear 4096 → BN → ReLU → Linear
256, τ_s = 0.1, τ_t = 0.04, teacher momentum 0.99 → 1.0 on a cosine, LARS — and a queue of 65,536
keys (MoCo v2's size here).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base, moco
from umm_jax.models.heads import MLP, ProjectionHeads

DEFAULTS = {
  "proj_hidden_dim": 4096,
  "proj_output_dim": 256,
  "temperature_student": 0.1,
  "temperature_teacher": 0.04,
  "queue_size": 65536,
}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """ReSSL's projector: Linear → BN → ReLU → Linear."""
  return ProjectionHeads(projector=MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"]))


def ressl_loss(
  q: jax.Array,
  k: jax.Array,
  queue: jax.Array,
  *,
  temperature_student: float,
  temperature_teacher: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy from the teacher's to the student's relation with the queue.

  Args:
    q: `[n, d]` student projections of the strong view.
    k: `[n, d]` teacher projections of the weak view (no gradient reaches them).
    queue: `[K, d]` unit-norm teacher embeddings of earlier batches (no gradient).
    temperature_student: τ_s > 0.
    temperature_teacher: τ_t > 0, usually below τ_s (a sharper target).

  Returns:
    `(loss, metrics)`: the scalar loss and `teacher_entropy`, the mean entropy of `p_t`.
  """
  if q.ndim != 2 or k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(
      f"ressl_loss expects q, k [n, d] and queue [K, d]; got {q.shape}, {k.shape}, {queue.shape}"
    )
  q = base.l2_normalize(q.astype(jnp.float32))
  k = jax.lax.stop_gradient(base.l2_normalize(k.astype(jnp.float32)))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  log_p_teacher = jax.nn.log_softmax(k @ queue.T / temperature_teacher, axis=-1)
  log_p_student = jax.nn.log_softmax(q @ queue.T / temperature_student, axis=-1)
  p_teacher = jnp.exp(log_p_teacher)
  loss = -jnp.mean(jnp.sum(p_teacher * log_p_student, axis=-1))
  entropy = -jnp.mean(jnp.sum(p_teacher * log_p_teacher, axis=-1))
  return loss, {"teacher_entropy": entropy}


def init_queue(hp: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """A queue of random unit vectors `[K, d]` and the pointer 0."""
  shape = (hp["queue_size"], hp["proj_output_dim"])
  return {
    "queue": base.l2_normalize(jax.random.normal(key, shape, jnp.float32)),
    "ptr": jnp.zeros((), jnp.int32),
  }


def objective(online, target, state, hp):
  """`ressl_loss(student of view 1, teacher of view 2, queue)`; the teacher's keys then enqueue."""
  if target is None:
    raise ValueError("ReSSL's objective needs the teacher's outputs, got target=None")
  q, _ = base.split_views(online["projection"], "online['projection']")
  _, k = base.split_views(target["projection"], "target['projection']")
  loss, metrics = ressl_loss(
    q,
    k,
    state["queue"],
    temperature_student=hp["temperature_student"],
    temperature_teacher=hp["temperature_teacher"],
  )
  keys = jax.lax.stop_gradient(base.l2_normalize(k.astype(jnp.float32)))
  queue, ptr = moco.enqueue(state["queue"], state["ptr"], keys)
  z = online["projection"]
  metrics.update(base.collapse_metrics(z.reshape(-1, z.shape[-1])))
  return loss, metrics, {"queue": queue, "ptr": ptr}


METHODS = (
  base.Method(
    name="ressl",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="ressl",
    target_momentum=(0.99, 1.0),
    init_state=init_queue,
  ),
)
