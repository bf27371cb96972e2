"""SwAV: swapped prediction of online cluster codes (Caron et al. 2020, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments", arXiv:2006.09882).

Each view's L2-normalised projection is scored against K L2-normalised prototypes (cosine
similarities). Sinkhorn-Knopp turns a view's scores into codes, soft assignments of the samples
that spread the batch equally over the prototypes, computed without gradient; each view then
predicts the other view's codes with a softmax over its own scores at temperature τ.

Defaults follow solo-learn's CIFAR recipe (`scripts/pretrain/cifar/swav.yaml`,
`solo/methods/swav.py`): projector Linear 2048 → BN → ReLU → Linear 128, 3000 prototypes,
τ = 0.1, Sinkhorn with ε = 0.05 and 3 iterations, a queue of 3840 past projections per view,
LARS, two 32-px views (no multi-crop) with SwAV's colour jitter (solo-learn's `symmetric.yaml`).
Two departures, both from the official code (`facebookresearch/swav`, `main_swav.py`):
- the prototypes are unit vectors (`base.l2_normalize` inside the forward pass, as the official
  code's re-normalisation after every step); solo-learn's `weight_norm` also learns a norm per
  prototype;
- schedules count steps, not epochs, because the objective sees neither: solo-learn's
  `epoch_queue_starts: 50` and `freeze_prototypes_epochs: 2` become 9750 and 390 steps (195
  steps per epoch: CIFAR's 50,000 images in batches of 256, the last one dropped). The official
  code counts the freeze in iterations too (`freeze_prototypes_niters`).

The queue: `[2, queue_size, d]` of the latest projections of each view, newest first, filled
from step 0. Once `step ≥ queue_start_step` and the queue is full (the official code waits for
a full queue, solo-learn for the start epoch), the queue's scores against the current prototypes
join the batch's in Sinkhorn, so the equal-partition constraint covers `n + queue_size` samples;
only the batch's codes enter the loss. `queue_size = 0` turns it off.

Frozen prototypes: for the first `freeze_prototypes_steps` steps no gradient reaches the
prototypes (a `stop_gradient`). Unlike PyTorch's `p.grad = None`, which skips the parameter,
the optimiser still applies its weight decay to them; at SwAV's 1e-6 the difference is nil.

Under `jit` on global arrays the Sinkhorn sums cover the global batch, as the official code's
`all_reduce` does.
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from umm_jax.methods import base
from umm_jax.models.heads import MLP

DEFAULTS = {
  "proj_hidden_dim": 2048,
  "proj_output_dim": 128,
  "num_prototypes": 3000,
  "temperature": 0.1,
  "sk_epsilon": 0.05,
  "sk_iters": 3,
  "queue_size": 3840,
  "queue_start_step": 9750,
  "freeze_prototypes_steps": 390,
}


class SwAVHeads(nn.Module):
  """Projector and prototypes: `{'projection': [N, d], 'prototypes': [d, K]}`, both unit-norm.

  `projection` holds the L2-normalised rows of the projector's output, `prototypes` the
  L2-normalised columns of the prototype matrix (the parameter `prototypes`, initialised as
  `umm_jax.models.heads.Prototypes`); their product is the `[N, K]` matrix of cosine scores
  `heads.Prototypes` computes. The objective forms the product itself, so that it can stop the
  prototypes' gradient while they are frozen and score the queue against them.

  Attributes:
    projector: module `[N, D] -> [N, d]` taking `train=`.
    num_prototypes: K.
  """

  projector: nn.Module
  num_prototypes: int

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
    z = self.projector(features["embedding"], train=train).astype(jnp.float32)
    w = self.param(
      "prototypes", nn.initializers.lecun_normal(), (z.shape[-1], self.num_prototypes), jnp.float32
    )
    return {"projection": base.l2_normalize(z), "prototypes": base.l2_normalize(w, axis=0)}


def heads(hp: Mapping[str, Any]) -> nn.Module:
  """SwAV's projector Linear → BN → ReLU → Linear and `num_prototypes` prototypes."""
  projector = MLP((hp["proj_hidden_dim"],), hp["proj_output_dim"])
  return SwAVHeads(projector=projector, num_prototypes=hp["num_prototypes"])


def sinkhorn(scores: jax.Array, *, epsilon: float, num_iters: int) -> jax.Array:
  """SwAV's codes: Sinkhorn-Knopp on `exp(scores / ε)`, without gradient.

  `Q ∝ exp(scores / ε)` starts with total mass 1; each iteration rescales every column
  (prototype) to mass `1/K`, then every row (sample) to mass `1/n`; the result is `n · Q`, whose
  rows sum to 1 (a soft assignment per sample) and whose columns sum to about `n/K` (exactly in
  the limit of many iterations). This is the official `distributed_sinkhorn` on the transposed
  matrix, computed in the log domain (the same values, without overflow of `exp`).

  Args:
    scores: `[n, K]` scores of n samples against K prototypes (rows are samples).
    epsilon: ε > 0, the entropic regularisation; smaller is closer to a hard assignment.
    num_iters: number of column-then-row rescalings (≥ 0).

  Returns:
    `[n, K]` float32 codes; no gradient flows back to `scores`.
  """
  if scores.ndim != 2:
    raise ValueError(f"sinkhorn expects [n, K] scores, got shape {scores.shape}")
  if num_iters < 0:
    raise ValueError(f"sinkhorn needs num_iters ≥ 0, got {num_iters}")
  n, k = scores.shape
  log_q = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  log_q = log_q - jax.nn.logsumexp(log_q)

  def rescale(_, log_q):
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - math.log(k)
    return log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - math.log(n)

  # A loop, not unrolled: the compiled graph stays one iteration long for any num_iters.
  log_q = jax.lax.fori_loop(0, num_iters, rescale, log_q)
  return jnp.exp(log_q + math.log(n))


def swav_loss(
  scores1: jax.Array,
  scores2: jax.Array,
  *,
  temperature: float,
  epsilon: float,
  num_iters: int,
  queue_scores: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SwAV's swapped prediction loss over two views.

  With `q_v = sinkhorn(scores_v)` (codes, no gradient) and `p_v = softmax(scores_v / τ)`:
    `L = ½ [ −mean_i Σ_k q1_ik log p2_ik − mean_i Σ_k q2_ik log p1_ik ]`,
  each view predicting the other's codes (the official code's average over the views assigned
  codes, of the average over the other views). With a queue, view v's codes come from Sinkhorn
  on `[queue_scores[v]; scores_v]` `[Q + n, K]`, keeping the batch's n rows.

  Args:
    scores1: `[n, K]` cosine scores of the first view's projections against the prototypes.
    scores2: `[n, K]` the same for the second view; row i of both comes from image i.
    temperature: τ > 0 of the predicting softmax.
    epsilon: Sinkhorn's ε.
    num_iters: Sinkhorn's iterations.
    queue_scores: optional `[2, Q, K]` scores of each view's queued projections against the
      current prototypes (no gradient reaches them).

  Returns:
    `(loss, metrics)`: the scalar loss and `code_entropy`, the mean entropy (nats) of the
    batch's codes, `log K` for uniform codes and 0 for hard ones.
  """
  if scores1.ndim != 2 or scores1.shape != scores2.shape:
    raise ValueError(
      f"swav_loss expects two [n, K] score arrays of one shape, got {scores1.shape}, "
      f"{scores2.shape}"
    )
  n, k = scores1.shape
  if queue_scores is not None and (
    queue_scores.ndim != 3 or queue_scores.shape[0] != 2 or queue_scores.shape[2] != k
  ):
    raise ValueError(
      f"swav_loss expects queue_scores [2, Q, K] with K = {k}, got shape {queue_scores.shape}"
    )
  scores = [scores1.astype(jnp.float32), scores2.astype(jnp.float32)]
  codes = []
  for v, s in enumerate(scores):
    if queue_scores is not None:
      s = jnp.concatenate([queue_scores[v].astype(jnp.float32), s])
    codes.append(sinkhorn(s, epsilon=epsilon, num_iters=num_iters)[-n:])
  log_p = [jax.nn.log_softmax(s / temperature, axis=-1) for s in scores]
  loss1 = -jnp.mean(jnp.sum(codes[0] * log_p[1], axis=-1))
  loss2 = -jnp.mean(jnp.sum(codes[1] * log_p[0], axis=-1))
  q = jnp.stack(codes)
  entropy = -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0)), 0.0), axis=-1)
  return (loss1 + loss2) / 2, {"code_entropy": entropy.mean()}


def enqueue(queue: jax.Array, projections: jax.Array) -> jax.Array:
  """First-in first-out update, newest first: `[projections; queue]` cut to the queue's length.

  Args:
    queue: `[2, Q, d]` projections of each view, newest first.
    projections: `[2, n, d]` the batch's projections.

  Returns:
    `[2, Q, d]`: the n new rows first, then the `Q − n` newest old ones (the n oldest drop out).
  """
  if queue.ndim != 3 or projections.ndim != 3 or projections.shape[::2] != queue.shape[::2]:
    raise ValueError(
      f"enqueue expects queue [2, Q, d] and projections [2, n, d]; got {queue.shape}, "
      f"{projections.shape}"
    )
  merged = jnp.concatenate([projections.astype(queue.dtype), queue], axis=1)
  return merged[:, : queue.shape[1]]


def init_state(hp: Mapping[str, Any], key: jax.Array) -> dict[str, jax.Array]:
  """The step count (int32) and, when `queue_size > 0`, an empty (zero) queue `[2, Q, d]`."""
  del key
  state = {"step": jnp.zeros((), jnp.int32)}
  if hp["queue_size"] > 0:
    state["queue"] = jnp.zeros((2, hp["queue_size"], hp["proj_output_dim"]), jnp.float32)
  return state


def objective(online, target, state, hp):
  """SwAV's loss on the two views' prototype scores; the projections then enter the queue."""
  del target
  z1, z2 = base.split_views(online["projection"], "online['projection']")
  w, _ = base.split_views(online["prototypes"], "online['prototypes']")
  step = state["step"]
  # While frozen, the prototypes get no gradient; the projector still does.
  w = jnp.where(step < hp["freeze_prototypes_steps"], jax.lax.stop_gradient(w), w)
  scores1, scores2 = z1 @ w, z2 @ w
  loss_fn = lambda queue_scores: swav_loss(
    scores1,
    scores2,
    temperature=hp["temperature"],
    epsilon=hp["sk_epsilon"],
    num_iters=hp["sk_iters"],
    queue_scores=queue_scores,
  )
  new_state = {"step": step + 1}
  if hp["queue_size"] > 0:
    queue = state["queue"]
    # The official code waits for a full queue: step · n ≥ Q rows written.
    full_at = -(-hp["queue_size"] // z1.shape[0])
    use_queue = step >= max(hp["queue_start_step"], full_at)
    queue_scores = queue @ jax.lax.stop_gradient(w)
    loss, metrics = jax.lax.cond(use_queue, loss_fn, lambda _: loss_fn(None), queue_scores)
    new_state["queue"] = enqueue(queue, jax.lax.stop_gradient(jnp.stack([z1, z2])))
    metrics["queue_used"] = use_queue.astype(jnp.float32)
  else:
    loss, metrics = loss_fn(None)
  metrics.update(base.collapse_metrics(jnp.concatenate([z1, z2])))
  return loss, metrics, new_state


METHODS = (
  base.Method(
    name="swav",
    heads=heads,
    objective=objective,
    defaults=DEFAULTS,
    optimizer="lars",
    recipe="swav",
    init_state=init_state,
  ),
)
