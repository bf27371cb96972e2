"""ResNets against torchvision's parameter counts, closed-form shapes and a NumPy forward pass;
the early/late split identity; the CPU convolution's gradients against XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from umm_jax.models import resnet

EPS = 1e-5


def _count(model, size):
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  return sum(p.size for p in jax.tree.leaves(jax.eval_shape(init)["params"]))


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_matches_torchvision(name, expected):
  model = resnet.create(name, stem="imagenet", num_classes=1000)
  assert _count(model, 224) == expected


@pytest.mark.parametrize(
  "name, stem, size, channels, sides",
  [
    ("resnet10", "cifar", 32, 3, (32, 32, 16, 8, 4)),
    ("resnet18", "imagenet", 224, 3, (56, 56, 28, 14, 7)),
    ("resnet34", "cifar", 16, 1, (16, 16, 8, 4, 2)),
    ("resnet50", "imagenet", 224, 1, (56, 56, 28, 14, 7)),
    ("resnet50", "cifar", 32, 3, (32, 32, 16, 8, 4)),
  ],
)
def test_stage_shapes(name, stem, size, channels, sides):
  model = resnet.create(name, stem=stem, width=8)
  x = jnp.zeros((2, size, size, channels))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  expansion = 4 if name == "resnet50" else 1
  widths = (8, 8 * expansion, 16 * expansion, 32 * expansion, 64 * expansion)
  for stage, side, width in zip(resnet.STAGES, sides, widths, strict=True):
    assert out[stage].shape == (2, side, side, width), stage
  assert out["embedding"].shape == (2, widths[-1])
  assert variables["params"]["stem"]["conv1"]["kernel"].shape[2] == channels
  assert sorted(variables["params"]) == sorted(resnet.STAGES)


# --- NumPy reference forward pass (eval mode) -------------------------------------------------


def _np_conv(x, w, stride):
  """PyTorch Conv2d(padding=k // 2, bias=False) as a sum over kernel taps."""
  k, pad = w.shape[0], w.shape[0] // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
  out = 0.0
  for i in range(k):
    for j in range(k):
      out = out + xp[:, i::stride, j::stride][:, :ho, :wo] @ w[i, j]
  return out


def _np_bn(x, p, s):
  return (x - s["mean"]) / np.sqrt(s["var"] + EPS) * p["scale"] + p["bias"]


def _np_maxpool(x):
  """PyTorch MaxPool2d(3, stride=2, padding=1)."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  taps = [xp[:, i::2, j::2][:, :ho, :wo] for i in range(3) for j in range(3)]
  return np.max(taps, axis=0)


def _np_block(x, p, s, kind, stride):
  relu = lambda v: np.maximum(v, 0)
  if kind == "basic":
    y = relu(_np_bn(_np_conv(x, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"]))
    y = _np_bn(_np_conv(y, p["conv2"]["kernel"], 1), p["bn2"], s["bn2"])
  else:  # torchvision v1.5: the stride sits on the 3×3 conv.
    y = relu(_np_bn(_np_conv(x, p["conv1"]["kernel"], 1), p["bn1"], s["bn1"]))
    y = relu(_np_bn(_np_conv(y, p["conv2"]["kernel"], stride), p["bn2"], s["bn2"]))
    y = _np_bn(_np_conv(y, p["conv3"]["kernel"], 1), p["bn3"], s["bn3"])
  if "downsample_conv" in p:
    x = _np_bn(
      _np_conv(x, p["downsample_conv"]["kernel"], stride), p["downsample_bn"], s["downsample_bn"]
    )
  return relu(y + x)


def _variables(model, x, seed):
  """Random variables of `model`'s shapes, BN statistics included, drawn in NumPy.

  Random BN affine parameters and running statistics keep eval-mode BN from being an identity;
  NumPy draws skip compiling `model.init`.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  leaves, treedef = jax.tree.flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  new = []
  for path, leaf in leaves:
    name = path[-1].key
    if name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name in ("bias", "mean"):
      value = rng.normal(0.0, 0.2, leaf.shape)
    else:
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    new.append(jnp.asarray(value, jnp.float32))
  return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("name, stem", [("resnet10", "imagenet"), ("resnet50", "cifar")])
def test_forward_matches_numpy(name, stem):
  model = resnet.create(name, stem=stem, width=8)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  variables = _variables(model, x, 1)
  out = model.apply(variables, jnp.asarray(x), train=False, stop="layer2")
  p, s = variables["params"], variables["batch_stats"]

  conv = p["stem"]["conv1"]["kernel"]
  ref = np.maximum(
    _np_bn(_np_conv(x, conv, 2 if stem == "imagenet" else 1), p["stem"]["bn1"], s["stem"]["bn1"]), 0
  )
  if stem == "imagenet":
    ref = _np_maxpool(ref)
  np.testing.assert_allclose(out["stem"], ref, rtol=1e-4, atol=1e-4)
  kind = "bottleneck" if name == "resnet50" else "basic"
  for stage, stride in (("layer1", 1), ("layer2", 2)):
    blocks = sorted(p[stage], key=lambda b: int(b.removeprefix("block")))
    for i, block in enumerate(blocks):
      ref = _np_block(ref, p[stage][block], s[stage][block], kind, stride if i == 0 else 1)
    np.testing.assert_allclose(out[stage], ref, rtol=1e-4, atol=1e-4)


def test_init_follows_torchvision():
  model = resnet.create("resnet10", width=8, zero_init_residual=True)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
    jnp.zeros((1, 8, 8, 3))
  )
  block = variables["params"]["layer4"]["block0"]
  np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
  np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(block["downsample_bn"]["scale"], 1.0)
  kernel = np.asarray(block["conv2"]["kernel"])  # [3, 3, 64, 64]: He fan-out std sqrt(2 / 576)
  assert abs(kernel.mean()) < 0.03 * np.sqrt(2 / 576)  # ~6 standard errors
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / 576), rtol=0.03)


# --- Early / late split -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  model = resnet.create("resnet10", width=8, num_classes=3)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 16, 3)), jnp.float32)
  return model, _variables(model, x, 3), x


@pytest.mark.parametrize("at", resnet.SPLIT_POINTS)
def test_split_variables_are_disjoint_and_merge_back(tiny, at):
  _, variables, _ = tiny
  early, late = resnet.split_variables(variables, at)
  cut = resnet.STAGES.index(at) + 1
  for collection in ("params", "batch_stats"):
    assert set(early[collection]) == set(resnet.STAGES[:cut])
    assert set(late[collection]) == set(resnet.STAGES[cut:]) | (
      {"fc"} if collection == "params" else set()
    )
  assert jax.tree.all(jax.tree.map(np.array_equal, resnet.merge_variables(early, late), variables))
  with pytest.raises(ValueError, match="both parts"):
    resnet.merge_variables(early, variables)


@pytest.mark.parametrize("at", resnet.SPLIT_POINTS)
def test_split_composes_to_the_full_model(tiny, at):
  model, variables, x = tiny
  f = resnet.split(model, at)
  early, late = resnet.split_variables(variables, at)

  full = model.apply(variables, x, train=False)
  z = f.early(early, x, train=False)
  np.testing.assert_array_equal(z, full[at])
  out = f.late(late, z, train=False)
  assert set(out) == set(resnet.STAGES[resnet.STAGES.index(at) + 1 :]) | {"embedding", "logits"}
  for key, value in out.items():
    np.testing.assert_allclose(value, full[key], rtol=1e-6, atol=1e-6)

  # Train mode: batch statistics normalise, and each part updates its own running statistics.
  full, full_stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
  z, early_stats = f.early(early, x, train=True, mutable=["batch_stats"])
  out, late_stats = f.late(late, z, train=True, mutable=["batch_stats"])
  for key, value in out.items():
    np.testing.assert_allclose(value, full[key], rtol=1e-6, atol=1e-6)
  merged = resnet.merge_variables(early_stats, late_stats)
  assert jax.tree.all(
    jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-6, atol=1e-7), merged, full_stats)
  )
  assert not jax.tree.all(
    jax.tree.map(np.array_equal, full_stats, {"batch_stats": variables["batch_stats"]})
  )


# --- Convolution -------------------------------------------------------------------------------


def _lax_conv(x, w, stride):
  pad = w.shape[0] // 2
  dn = ("NHWC", "HWIO", "NHWC")
  return lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=dn)


@pytest.mark.parametrize("k, stride, c_in", [(1, 1, 4), (1, 2, 4), (3, 1, 4), (3, 2, 4), (7, 2, 3)])
def test_cpu_fast_conv_matches_xla(k, stride, c_in):
  rng = np.random.default_rng(k + stride)
  x = jnp.asarray(rng.normal(size=(2, 7, 9, c_in)), jnp.float32)  # odd, non-square sides
  w = jnp.asarray(rng.normal(size=(k, k, c_in, 5)), jnp.float32)
  y, vjp = jax.vjp(lambda x, w: resnet.conv2d(x, w, stride=stride, impl="cpu_fast"), x, w)
  y_ref, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, stride), x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    y, _np_conv(np.asarray(x), np.asarray(w), stride), rtol=1e-4, atol=1e-4
  )
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for grad, grad_ref in zip(vjp(dy), vjp_ref(dy), strict=True):
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-5 * np.abs(grad_ref).max())


def test_cpu_fast_conv_composes_with_transforms():
  """Hessian-vector products by reverse over reverse (the implicit hyper-gradient) and
  per-example Jacobians by vmap of jacrev (the exact log-volume) equal XLA's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
  w, v = (jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32) for _ in range(2))
  fast = lambda x, w: resnet.conv2d(x, w, stride=2, impl="cpu_fast")
  xla = lambda x, w: _lax_conv(x, w, 2)

  def hvp(conv):
    loss = lambda w: jnp.sum(jnp.tanh(conv(x, w)))
    return jax.grad(lambda w: jnp.vdot(jax.grad(loss)(w), v))(w)

  def jacobians(conv):
    f = lambda xi, w: jnp.tanh(conv(xi[None], w)).ravel()
    return jax.vmap(jax.jacrev(f, argnums=(0, 1)), in_axes=(0, None))(x, w)

  for a, b in zip(
    jax.tree.leaves((hvp(fast), jacobians(fast))),
    jax.tree.leaves((hvp(xla), jacobians(xla))),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def _resnet_grads(conv_impl, x, labels):
  """Cross-entropy gradients (parameters, input) of a tiny train-mode ResNet."""
  model = resnet.create("resnet10", stem="imagenet", width=8, num_classes=3, conv_impl=conv_impl)
  variables = _variables(model, x, 5)

  def loss(params, x):
    out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    logp = jax.nn.log_softmax(out["logits"])
    return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)


def test_resnet_gradients_cpu_fast_equal_xla():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 16, 16, 3)), jnp.float32)
  labels = jnp.array([0, 1, 2, 1])
  fast, ref = (jax.tree.leaves(_resnet_grads(impl, x, labels)) for impl in ("cpu_fast", "xla"))
  for g, g_ref in zip(fast, ref, strict=True):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=2e-6 * np.abs(g_ref).max())


def test_auto_conv_impl_follows_the_backend():
  expected = "cpu_fast" if jax.default_backend() == "cpu" else "xla"
  assert resnet.resolve_conv_impl("auto") == expected
  assert resnet.resolve_conv_impl("xla") == "xla"


# --- bf16, errors --------------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_parameters_and_embedding():
  model = resnet.create("resnet10", width=8, num_classes=3, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out["layer2"].dtype == jnp.bfloat16
  assert out["embedding"].dtype == jnp.float32

  def loss(variables):
    out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return out["logits"].sum()

  grads = jax.eval_shape(jax.grad(loss), variables)["params"]
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_invalid_names_raise_listing_the_valid_ones():
  with pytest.raises(ValueError, match="resnet18"):
    resnet.create("resnet19")
  with pytest.raises(ValueError, match="imagenet"):
    resnet.create("resnet18", stem="mnist")
  with pytest.raises(ValueError, match="cpu_fast"):
    resnet.create("resnet18", conv_impl="cuda")
  model = resnet.create("resnet10", width=8)
  for at in ("layer4", "fc", "input"):
    with pytest.raises(ValueError, match="layer3"):
      resnet.split(model, at)
    with pytest.raises(ValueError, match="layer3"):
      resnet.split_variables({"params": {}}, at)
  with pytest.raises(ValueError, match="shape"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((16, 16, 3)), train=False))
  with pytest.raises(ValueError, match="comes before"):
    jax.eval_shape(
      lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False, start="layer2", stop="layer1"
      )
    )
  with pytest.raises(ValueError, match=r"\(3, 3, 4, 5\)"):
    resnet.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 4, 5)), stride=1)
