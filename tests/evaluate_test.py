"""Tests for umm_jax.evaluate, each against an independent NumPy reference.

- kNN: a float64 brute-force loop over test rows that ranks classes by the documented rule
  (vote count, then nearest neighbour; or the sum of `exp(s / T)`), on data checked to have no
  near-ties, so predictions must agree exactly.
- linear probe: Newton's method in float64 on the same L2-regularised softmax regression
  (converged to machine precision) against the jitted SGD loop, full batch and minibatch.
- features: the model applied directly to the resized, standardised images.
"""

import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umm_jax import evaluate, finetune, umm_stage
from umm_jax.models import resnet

C = 10


# ----------------------------------------------------------------------------- kNN


def np_knn_ranking(train, labels, test, *, k, temperature, num_classes):
  """Classes of each test row `[m, num_classes]`, best first, by brute force in float64."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  train, test = unit(np.asarray(train, np.float64)), unit(np.asarray(test, np.float64))
  rankings = []
  for q in test:
    sims = train @ q
    nearest = np.argsort(-sims, kind="stable")[:k]
    if temperature is None:
      counts = {c: 0 for c in range(num_classes)}
      first = {c: k for c in range(num_classes)}  # rank of the class's nearest neighbour
      for rank, i in enumerate(nearest):
        counts[labels[i]] += 1
        first[labels[i]] = min(first[labels[i]], rank)
      key = lambda c, counts=counts, first=first: (-counts[c], first[c], c)
    else:
      score = np.zeros(num_classes)
      for i in nearest:
        score[labels[i]] += np.exp(sims[i] / temperature)
      key = lambda c, score=score: (-score[c], c)
    rankings.append(sorted(range(num_classes), key=key))
  return np.array(rankings)


def _no_near_ties(train, test, k, temperature):
  """The neighbour sets (and, for the majority vote, their order) are clear of float32 error."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = -np.sort(-(unit(test.astype(np.float64)) @ unit(train.astype(np.float64)).T), axis=1)
  gaps = -np.diff(sims[:, : k + 1], axis=1)
  return (gaps if temperature is None else gaps[:, -1:]).min() > 1e-5


@pytest.fixture(scope="module")
def features():
  # Seed 2: every row's neighbour set (and order of the 5 nearest) is clear of float32 error.
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(C, 16))
  train_labels = rng.integers(0, C, 300)
  test_labels = rng.integers(0, C, 50)
  train = (centres[train_labels] + 1.5 * rng.normal(size=(300, 16))).astype(np.float32)
  test = (centres[test_labels] + 1.5 * rng.normal(size=(50, 16))).astype(np.float32)
  return train, train_labels, test, test_labels


@pytest.mark.parametrize("k, temperature", [(5, None), (4, None), (200, 0.1), (20, 0.5)])
def test_knn_matches_brute_force(features, k, temperature):
  train, labels, test, test_labels = features
  assert _no_near_ties(train, test, k, temperature)
  expected = np_knn_ranking(train, labels, test, k=k, temperature=temperature, num_classes=C)
  scores = np.asarray(
    evaluate.knn_classify(train, labels, test, k=k, temperature=temperature, num_classes=C)
  )
  ranked = np.argsort(-scores, axis=1, kind="stable")
  np.testing.assert_array_equal(ranked[:, 0], expected[:, 0])
  np.testing.assert_array_equal(ranked[:, :5], expected[:, :5])
  result = evaluate.knn_accuracy(
    train, labels, test, test_labels, k=k, temperature=temperature, num_classes=C
  )
  assert result["top1"] == np.mean(expected[:, 0] == test_labels)
  assert result["top5"] == np.mean(np.any(expected[:, :5] == test_labels[:, None], axis=1))
  assert result["protocol"]["k"] == k and result["protocol"]["temperature"] == temperature
  if temperature is None:
    # The integer part of a majority-vote score is the vote count; some rows need the tie-break.
    counts = np.floor(scores)
    assert np.all(counts.sum(axis=1) == k)
    assert np.any(np.sum(counts == counts.max(axis=1, keepdims=True), axis=1) > 1)


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_knn_chunking_does_not_change_scores(features, temperature):
  train, labels, test, _ = features
  run = lambda chunk: np.asarray(
    evaluate.knn_classify(
      train, labels, test, k=7, temperature=temperature, num_classes=C, chunk_size=chunk
    )
  )
  whole = run(1024)
  for chunk in (7, 50):
    np.testing.assert_allclose(run(chunk), whole, rtol=1e-6)
    np.testing.assert_array_equal(run(chunk).argmax(axis=1), whole.argmax(axis=1))


def test_knn_rejects_bad_input(features):
  train, labels, test, _ = features
  with pytest.raises(ValueError, match="k=301"):
    evaluate.knn_classify(train, labels, test, k=301, temperature=None, num_classes=C)
  with pytest.raises(ValueError, match=r"\(300, 16\).*\(50, 8\)"):
    evaluate.knn_classify(train, labels, test[:, :8], k=5, temperature=None, num_classes=C)
  with pytest.raises(ValueError, match="labels"):
    evaluate.knn_classify(train, labels + 1, test, k=5, temperature=None, num_classes=C)


# ----------------------------------------------------------------------------- linear probe


def np_softmax_regression(x, y, num_classes, weight_decay):
  """Minimiser of `mean CE(x W + b, y) + wd/2 ‖W‖²` by Newton's method (float64), `Σ b = 0`."""
  n, d = x.shape
  xb = np.hstack([x, np.ones((n, 1))])
  onehot = np.eye(num_classes)[y]
  reg = np.diag(np.r_[np.full(d, weight_decay), 0.0])
  theta = np.zeros((d + 1, num_classes))
  for _ in range(30):
    logits = xb @ theta
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grad = xb.T @ (p - onehot) / n + reg @ theta
    curvature = np.einsum("ic,ce->ice", p, np.eye(num_classes)) - np.einsum("ic,ie->ice", p, p)
    hess = np.einsum("ia,ib,ice->acbe", xb, xb, curvature) / n
    hess += np.einsum("ab,ce->acbe", reg, np.eye(num_classes))
    size = (d + 1) * num_classes
    # Least squares: shifting every bias by the same amount is a flat direction.
    theta -= np.linalg.lstsq(hess.reshape(size, size), grad.reshape(-1), rcond=None)[0].reshape(
      d + 1, num_classes
    )
  assert np.abs(grad).max() < 1e-12
  return theta[:d], theta[d]


def np_objective(x, y, w, b, weight_decay):
  logits = x @ w + b
  logits = logits - logits.max(axis=1, keepdims=True)
  ce = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]
  return ce.mean() + weight_decay / 2 * np.sum(w**2)


@pytest.fixture(scope="module")
def overlapping():
  """Three overlapping Gaussian classes in 4-D: the regularised optimum is interior, not at ∞."""
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 150)
  x = rng.normal(size=(3, 4))[y] + rng.normal(size=(150, 4))
  return x, y


@pytest.mark.parametrize(
  "batch_size, lr_start, lr_end, epochs, atol",
  [(150, 0.5, 0.5, 600, 1e-4), (32, 0.05, 1e-4, 400, 1e-2)],
  ids=["full_batch", "minibatch_decay"],
)
def test_fit_linear_classifier_reaches_the_regularised_optimum(
  overlapping, batch_size, lr_start, lr_end, epochs, atol
):
  x, y = overlapping
  wd = 0.05
  w_ref, b_ref = np_softmax_regression(x, y, 3, wd)
  params, losses, _ = evaluate.fit_linear_classifier(
    jnp.asarray(x, jnp.float32),
    jnp.asarray(y),
    jax.random.key(0),
    num_classes=3,
    epochs=epochs,
    batch_size=batch_size,  # 150 = 4 × 32 + 22: the last batch is partial and masked
    lr_start=lr_start,
    lr_end=lr_end,
    momentum=0.9,
    weight_decay=wd,
  )
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  np.testing.assert_allclose(w, w_ref, atol=atol)
  np.testing.assert_allclose(b - b.mean(), b_ref - b_ref.mean(), atol=atol)
  optimum = np_objective(x, y, w_ref, b_ref, wd)
  assert 0 <= np_objective(x, y, w, b, wd) - optimum < atol**2 * 10
  assert losses[-1] < losses[0]


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(2)
  centres = 3.0 * rng.normal(size=(C, 32))
  y, yt = rng.integers(0, C, 1000), rng.integers(0, C, 500)
  x = centres[y] + rng.normal(size=(1000, 32))
  xt = centres[yt] + rng.normal(size=(500, 32))
  result = evaluate.linear_probe(x, y, xt, yt, num_classes=C, layer="layer4")
  assert result["top1"] >= 0.99 and result["train_top1"] >= 0.99 and result["top5"] == 1.0
  assert result["protocol"] | evaluate.PROTOCOLS["linear"] == result["protocol"]
  assert result["protocol"]["layer"] == "layer4"
  assert result["protocol"]["features"].startswith("standardized")


def test_exponential_lr_schedule_endpoints_and_loop():
  kw = dict(lr_start=1e-2, lr_end=1e-6, epochs=500)
  assert evaluate.exponential_lr(0, **kw) == pytest.approx(1e-2, rel=1e-12)
  assert evaluate.exponential_lr(500, **kw) == pytest.approx(1e-6, rel=1e-12)
  gamma = (1e-6 / 1e-2) ** (1 / 500)
  assert evaluate.exponential_lr(7, **kw) / evaluate.exponential_lr(6, **kw) == pytest.approx(gamma)
  # The loop uses the schedule: lr of epoch e, the last one a factor γ above lr_end.
  x, y = np.ones((8, 2), np.float32), np.arange(8) % 2
  _, _, lrs = evaluate.fit_linear_classifier(
    x, y, jax.random.key(0), num_classes=2, epochs=20, batch_size=4, lr_start=0.1,
    lr_end=1e-3, momentum=0.9, weight_decay=0.0,
  )  # fmt: skip
  expected = 0.1 * (1e-3 / 0.1) ** (np.arange(20) / 20)
  np.testing.assert_allclose(lrs, expected, rtol=1e-5)
  assert lrs[-1] * (1e-3 / 0.1) ** (1 / 20) == pytest.approx(1e-3, rel=1e-5)


# ----------------------------------------------------------------------------- subsets, protocols


def test_semi_supervised_subset_is_balanced_deterministic_and_seeded():
  rng = np.random.default_rng(3)
  labels = rng.permutation(np.repeat(np.arange(C), 200))  # 2000 images, 200 per class
  for fraction, per_class in ((0.01, 2), (0.1, 20)):
    idx = finetune.semi_supervised_subset(labels, fraction=fraction, seed=0)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=C), np.full(C, per_class))
    again = finetune.semi_supervised_subset(labels, fraction=fraction, seed=0)
    np.testing.assert_array_equal(idx, again)
    other = finetune.semi_supervised_subset(labels, fraction=fraction, seed=1)
    assert len(other) == len(idx) and not np.array_equal(idx, other)
  # Unlabelled images (-1) are never picked; a class smaller than the quota gives all it has.
  labels[np.flatnonzero(labels == 9)[:195]] = -1
  idx = finetune.semi_supervised_subset(labels, fraction=0.1, seed=0)  # 1805 labelled → 18 each
  assert np.all(labels[idx] >= 0)
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=C), [18] * 9 + [5])
  with pytest.raises(ValueError, match="fraction"):
    finetune.semi_supervised_subset(labels, fraction=0.0, seed=0)


def test_protocols_are_keyword_arguments_of_their_functions():
  functions = {"knn": evaluate.knn_accuracy, "linear": evaluate.linear_probe}
  functions["semi"] = finetune.fine_tune
  for name, kwargs in evaluate.PROTOCOLS.items():
    parameters = inspect.signature(functions[name.split("_")[0]]).parameters
    assert set(kwargs) <= set(parameters), name
  assert evaluate.protocol("knn_k5") == {"k": 5, "temperature": None}
  with pytest.raises(ValueError, match="valid protocols"):
    evaluate.protocol("knn")


# ----------------------------------------------------------------------------- features, fine-tune


@pytest.fixture(scope="module")
def tiny_model():
  model = resnet.create("resnet10", width=4)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)), train=False))(
    jax.random.key(0)
  )
  # BatchNorm statistics off their initial 0 / 1, so inference mode visibly uses them.
  stats = variables["batch_stats"]
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(stats))))
  stats = jax.tree_util.tree_map_with_path(
    lambda path, v: (
      jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=2.0)
      if path[-1].key == "var"
      else 0.3 * jax.random.normal(next(keys), v.shape)
    ),
    stats,
  )
  return model, {**variables, "batch_stats": stats}


MEAN, STD = np.array([0.4, 0.5, 0.6], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


@pytest.mark.parametrize("source_size", [8, 6])
def test_extract_features_equal_the_models_pooled_outputs(tiny_model, source_size):
  model, variables = tiny_model
  images = np.random.default_rng(4).integers(0, 256, (10, source_size, source_size, 3), np.uint8)
  x = jax.image.resize(jnp.asarray(images, jnp.float32) / 255, (10, 8, 8, 3), "bilinear")
  out = model.apply(variables, (x - MEAN) / STD, train=False)
  layers = ("stem", "layer1", "layer2", "layer3", "layer4", "embedding")
  expected = {layer: out[layer].mean(axis=(1, 2)) for layer in layers[:-1]}
  expected["embedding"] = out["embedding"]
  kw = dict(image_size=8, mean=MEAN, std=STD)
  for batch_size in (4, 16):  # 10 images: the last batch of 4 is padded with 2 blank images
    got = evaluate.extract_features(
      model, variables, images, layers=layers, batch_size=batch_size, **kw
    )
    for layer in layers:
      assert got[layer].shape == expected[layer].shape and got[layer].dtype == np.float32
      np.testing.assert_allclose(got[layer], expected[layer], atol=1e-5, rtol=1e-5, err_msg=layer)
  early = evaluate.extract_features(
    model, variables, images, layers=("layer2", "stem"), batch_size=4, **kw
  )
  assert list(early) == ["layer2", "stem"]
  np.testing.assert_allclose(early["layer2"], expected["layer2"], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="valid"):
    evaluate.extract_features(model, variables, images, layers=("fc",), batch_size=4, **kw)


def _coloured_images(n, seed):
  """Class 0 reddish, class 1 bluish 8×8 images: separable by colour, any crop or flip."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 2
  base = np.where(labels[:, None] == 0, [180, 60, 60], [60, 60, 180])[:, None, None, :]
  images = base + rng.normal(0, 40, (n, 8, 8, 3))
  return np.clip(images, 0, 255).astype(np.uint8), labels


def test_fine_tune_trains_backbone_and_classifier(tiny_model):
  model, variables = tiny_model
  images, labels = _coloured_images(32, seed=5)
  test_images, test_labels = _coloured_images(16, seed=6)
  kw = dict(num_classes=2, image_size=8, mean=MEAN, std=STD, fraction=0.5, batch_size=8, seed=0)
  kw.update(classifier_lr=0.1, backbone_lr=0.05, momentum=0.9, eval_batch_size=16)
  data = (images, labels, test_images, test_labels)
  before = finetune.fine_tune(model, variables, *data, **kw, epochs=0).metrics
  tuned = finetune.fine_tune(model, variables, *data, **kw, epochs=15)
  metrics = tuned.metrics
  assert metrics["protocol"]["labelled"] == 16 and metrics["protocol"]["backbone_lr"] == 0.05
  assert metrics["train_top1"] >= 0.9 and metrics["train_top1"] > before["train_top1"]
  assert metrics["top1"] >= 0.9
  changed = jax.tree.map(
    lambda a, b: np.abs(np.asarray(a) - b).max(), tuned.variables["params"], variables["params"]
  )
  assert min(jax.tree.leaves(changed)) > 0
  # The backbone's own learning rate reaches it: at 0 its weights stay, the classifier moves.
  frozen = finetune.fine_tune(model, variables, *data, **{**kw, "backbone_lr": 0.0}, epochs=2)
  same = jax.tree.map(
    np.array_equal, frozen.variables["params"], jax.device_get(variables["params"])
  )
  assert all(jax.tree.leaves(same))
  assert frozen.metrics["train_loss"] is not None


def test_stage_evaluates_the_last_checkpoint_of_each_encoder(tmp_path):
  from configs import test as test_config
  from umm_jax import data, pretrain

  config = test_config.get_config()
  config.evaluate.linear_epochs = 3
  config.evaluate.layers = ("layer2", "embedding")
  config.evaluate.protocols = ("knn_k5", "linear", "semi_10pct")
  config.evaluate.semi_epochs = 1
  state = pretrain.pretrain(config, tmp_path)
  out = evaluate.run_stage(config, tmp_path)
  assert list(out) == ["baseline"]  # no UMM run in this work dir
  assert out["baseline"]["step"] == int(state.step)
  assert json.loads((tmp_path / evaluate.RESULTS_FILE).read_text()) == out
  # The stage's kNN equals kNN on features of the state pre-training returned.
  train_set, test_set = data.load(config.data, "train"), data.load(config.data, "test")
  mean, std = train_set.channel_stats()
  model = pretrain.create_model(config)
  feats = [
    evaluate.extract_features(
      model, state.online["backbone"], s.images, layers=("layer2",), image_size=16, mean=mean,
      std=std, batch_size=32,
    )["layer2"]
    for s in (train_set, test_set)
  ]  # fmt: skip
  expected = evaluate.knn_accuracy(
    feats[0], train_set.labels, feats[1], test_set.labels, k=5, temperature=None, num_classes=10
  )
  got = out["baseline"]["layers"]["layer2"]["knn_k5"]
  assert (got["top1"], got["top5"]) == (expected["top1"], expected["top5"])
  assert out["baseline"]["layers"]["embedding"]["linear"]["protocol"]["epochs"] == 3
  semi = out["baseline"]["semi_supervised"]["semi_10pct"]
  assert semi["protocol"]["fraction"] == 0.1 and semi["protocol"]["epochs"] == 1
  assert 0 <= semi["top1"] <= semi["top5"] <= 1


def test_encoders_are_found_in_table_1_order_with_the_papers_names(tmp_path):
  for sub in ("umm/umm/checkpoints", "umm/no_rate/checkpoints", "checkpoints", "umm/joint"):
    (tmp_path / sub).mkdir(parents=True)
  found = umm_stage.encoders(tmp_path)
  assert list(found) == ["baseline", "* (α = 0)", "+UMM"]  # 'joint' has no checkpoints folder
  assert found["* (α = 0)"] == tmp_path / "umm" / "no_rate" / "checkpoints"
