"""ResNets returning every stage's output, and UMM's split of the encoder into early and late parts.

ResNet-10/18/34 (basic blocks) and ResNet-50 (bottleneck blocks, torchvision's v1.5 layout
with the stride on the 3×3 convolution) [He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016], with torchvision's BatchNorm (PyTorch momentum 0.1, i.e. Flax
momentum 0.9; eps 1e-5) and padding (`k // 2` on each side), and two stems: ImageNet
(7×7/2 conv, BN, ReLU, 3×3/2 max-pool) and CIFAR (3×3/1 conv, BN, ReLU, no max-pool).

`model.apply(variables, x, train=...)` on images `[N, H, W, C]` (C = 1 or 3) returns
`{stage: [N, h, w, c]}` for every stage in `STAGES`, the global-average-pooled `embedding`
`[N, D]` (float32 whatever the compute dtype) and, with `num_classes`, `logits`.

On the CPU backend the convolutions default to `conv2d(..., impl='cpu_fast')`: XLA's forward
and input gradient, and a weight gradient computed as one matmul per kernel tap, several
times faster than XLA's CPU weight gradient (see `benchmarks/resnet_step_bench.py`).
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
SPLIT_POINTS = STAGES[:-1]
STEMS = ("cifar", "imagenet")
CONV_IMPLS = ("xla", "cpu_fast", "auto")
ARCHITECTURES = {
  "resnet10": ("basic", (1, 1, 1, 1)),
  "resnet18": ("basic", (2, 2, 2, 2)),
  "resnet34": ("basic", (3, 4, 6, 3)),
  "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _check(kind: str, value, valid) -> None:
  if value not in valid:
    raise ValueError(f"Unknown {kind} {value!r}; valid {kind}s: {list(valid)}")


def _xla_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  pad = w.shape[0] // 2
  return lax.conv_general_dilated(
    x, w, (stride, stride), [(pad, pad), (pad, pad)], dimension_numbers=_DIMENSION_NUMBERS
  )


def conv_weight_grad(x: jax.Array, dy: jax.Array, *, kernel_size: int, stride: int) -> jax.Array:
  """Gradient `[k, k, C, O]` of a PyTorch-padded convolution's loss with respect to its kernel.

  `dW[i, j] = Σ_{n,a,b} x_pad[n, i + s·a, j + s·b, :]ᵀ dy[n, a, b, :]`: for each kernel tap,
  the strided slice of the padded input `x` `[N, H, W, C]` that tap saw, contracted over batch
  and space with the output cotangent `dy` `[N, Ho, Wo, O]`. One `[N·Ho·Wo, C]ᵀ × [N·Ho·Wo, O]`
  matmul per tap, accumulated in float32.
  """
  n, ho, wo, out = dy.shape
  channels, pad = x.shape[-1], kernel_size // 2
  x_pad = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = dy.reshape(n * ho * wo, out)
  taps = []
  for i in range(kernel_size):
    for j in range(kernel_size):
      limit = (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, channels)
      tap = lax.slice(x_pad, (0, i, j, 0), limit, (1, stride, stride, 1))
      taps.append(
        lax.dot_general(
          tap.reshape(n * ho * wo, channels),
          dy,
          (((0,), (0,)), ((), ())),
          preferred_element_type=jnp.float32,
        )
      )
  return jnp.stack(taps).reshape(kernel_size, kernel_size, channels, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_fast_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  return _xla_conv(x, w, stride)


def _cpu_fast_fwd(x, w, stride):
  return _xla_conv(x, w, stride), (x, w)


def _cpu_fast_bwd(stride, residuals, dy):
  x, w = residuals
  # The convolution is linear in x: its transpose is XLA's input gradient, without the
  # forward pass that jax.vjp would also run outside jit.
  (dx,) = jax.linear_transpose(lambda v: _xla_conv(v, w, stride), x)(dy)
  dw = conv_weight_grad(x, dy, kernel_size=w.shape[0], stride=stride)
  return dx, dw.astype(w.dtype)


_cpu_fast_conv.defvjp(_cpu_fast_fwd, _cpu_fast_bwd)


def resolve_conv_impl(impl: str) -> str:
  """'auto' becomes 'cpu_fast' on the CPU backend and 'xla' elsewhere; others pass through."""
  _check("conv_impl", impl, CONV_IMPLS)
  if impl == "auto":
    return "cpu_fast" if jax.default_backend() == "cpu" else "xla"
  return impl


def conv2d(x: jax.Array, w: jax.Array, *, stride: int, impl: str = "auto") -> jax.Array:
  """Convolution of `x` `[N, H, W, C]` with kernel `w` `[k, k, C, O]` (k odd), no bias.

  Padding `k // 2` on each side as PyTorch's `Conv2d(padding=k // 2)`, so the output is
  `[N, (H - 1) // s + 1, (W - 1) // s + 1, O]`. Both implementations compute the same function
  and gradients: 'xla' is `lax.conv_general_dilated` with its own VJP; 'cpu_fast' keeps XLA's
  forward and input gradient and takes the weight gradient from `conv_weight_grad`. 'cpu_fast'
  supports reverse mode to any order but not forward mode (`jax.jvp`, `jax.jacfwd`): use 'xla'
  for those.
  """
  k = w.shape[0]
  if x.ndim != 4 or w.ndim != 4 or w.shape[1] != k or k % 2 == 0 or w.shape[2] != x.shape[-1]:
    raise ValueError(
      f"conv2d expects x [N, H, W, C] and an odd square kernel [k, k, C, O]; got x {x.shape}, "
      f"w {w.shape}"
    )
  if resolve_conv_impl(impl) == "cpu_fast":
    return _cpu_fast_conv(x, w, stride)
  return _xla_conv(x, w, stride)


def he_normal_fan_out(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """torchvision's conv init `kaiming_normal_(mode='fan_out')`: `N(0, 2 / (k·k·O))`, `[k, k, C, O]`.

  Drawn as a flat vector and reshaped: with partitionable threefry (JAX's default), XLA's CPU
  compile of a 4-D draw takes seconds (over 10 s for some shapes), a flat one a fraction.
  """
  k, _, _, out = shape
  flat = jax.random.normal(key, (math.prod(shape),), dtype)
  return (math.sqrt(2.0 / (k * k * out)) * flat).reshape(shape)


class Conv(nn.Module):
  """Bias-free k×k convolution with PyTorch padding and torchvision's init."""

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", he_normal_fan_out, shape, jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return conv2d(x, kernel, stride=self.stride, impl=self.conv_impl)


def _batch_norm(*, train: bool, dtype, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    scale_init=scale_init,
    name=name,
  )


class Block(nn.Module):
  """Residual block: 'basic' (two 3×3 convs) or 'bottleneck' (1×1, 3×3 with the stride, 1×1 ×4).

  The shortcut is a strided 1×1 conv + BN when the shape changes, else the identity. With
  `zero_init_residual` the last BN's scale starts at 0, so the block starts as the identity
  [Goyal et al., 2017].
  """

  kind: str
  features: int
  stride: int
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(Conv, dtype=self.dtype, conv_impl=self.conv_impl)
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    if self.kind == "basic":
      convs = [(self.features, 3, self.stride), (self.features, 3, 1)]
    else:
      convs = [(self.features, 1, 1), (self.features, 3, self.stride), (4 * self.features, 1, 1)]
    y = x
    for i, (features, k, stride) in enumerate(convs, start=1):
      y = conv(features, k, stride, name=f"conv{i}")(y)
      y = norm(name=f"bn{i}", zero_scale=self.zero_init_residual and i == len(convs))(y)
      if i < len(convs):
        y = nn.relu(y)
    if self.stride != 1 or x.shape[-1] != y.shape[-1]:
      x = conv(y.shape[-1], 1, self.stride, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class Stage(nn.Module):
  """`num_blocks` residual blocks; the first one carries the stride."""

  kind: str
  features: int
  num_blocks: int
  stride: int
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(self.num_blocks):
      x = Block(
        self.kind,
        self.features,
        self.stride if i == 0 else 1,
        self.zero_init_residual,
        self.dtype,
        self.conv_impl,
        name=f"block{i}",
      )(x, train=train)
    return x


class Stem(nn.Module):
  """'imagenet': 7×7/2 conv, BN, ReLU, 3×3/2 max-pool; 'cifar': 3×3/1 conv, BN, ReLU."""

  kind: str
  features: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool):
    k, stride = (7, 2) if self.kind == "imagenet" else (3, 1)
    x = Conv(self.features, k, stride, self.dtype, self.conv_impl, name="conv1")(x)
    x = nn.relu(_batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
    if self.kind == "imagenet":
      # Padding with -inf, as PyTorch's MaxPool2d(3, 2, padding=1).
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


class ResNet(nn.Module):
  """A ResNet returning every stage's output; runs only the stages after `start` up to `stop`.

  Attributes:
    block: 'basic' or 'bottleneck'.
    stage_sizes: blocks per stage, `layer1` to `layer4`.
    stem_type: 'cifar' or 'imagenet'.
    width: channels of the stem and `layer1`'s blocks; each later stage doubles them.
    num_classes: adds a linear classifier `fc` on the embedding (output `logits`).
    dtype: compute dtype; parameters stay float32 and the embedding is float32.
    zero_init_residual: each block's last BN scale starts at 0.
    conv_impl: 'xla', 'cpu_fast' or 'auto' (see `conv2d`).
  """

  block: str
  stage_sizes: Sequence[int]
  stem_type: str = "cifar"
  width: int = 64
  num_classes: int | None = None
  dtype: Any = jnp.float32
  zero_init_residual: bool = False
  conv_impl: str = "auto"

  def setup(self):
    _check("stem", self.stem_type, STEMS)
    _check("block", self.block, ("basic", "bottleneck"))
    _check("conv_impl", self.conv_impl, CONV_IMPLS)
    common = dict(dtype=self.dtype, conv_impl=self.conv_impl)
    stages = [
      Stage(self.block, self.width * 2**i, n, 1 if i == 0 else 2, self.zero_init_residual, **common)
      for i, n in enumerate(self.stage_sizes)
    ]
    # Attribute names are the parameter tree's top-level keys, which `split_variables` cuts.
    self.stem = Stem(self.stem_type, self.width, **common)
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    if self.num_classes is not None:
      self.fc = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(
    self, x: jax.Array, *, train: bool, start: str = "input", stop: str = "layer4"
  ) -> dict[str, jax.Array]:
    """Stages after `start` through `stop` on `x`: images, or the output of stage `start`.

    Returns `{stage: [N, h, w, c]}` for the stages run and, when `stop` is 'layer4', the
    float32 `embedding` `[N, D]` (spatial mean of `layer4`) and `logits` if `num_classes`.
    """
    _check("start", start, ("input", *SPLIT_POINTS))
    _check("stop", stop, STAGES)
    first = 0 if start == "input" else STAGES.index(start) + 1
    last = STAGES.index(stop)
    if first > last:
      raise ValueError(f"stop {stop!r} comes before the first stage after start {start!r}")
    if x.ndim != 4:
      raise ValueError(f"ResNet expects inputs [N, H, W, C], got shape {x.shape}")
    out = {}
    for name in STAGES[first : last + 1]:
      x = getattr(self, name)(x, train=train)
      out[name] = x
    if stop == "layer4":
      out["embedding"] = x.astype(jnp.float32).mean(axis=(1, 2))
      if self.num_classes is not None:
        out["logits"] = self.fc(out["embedding"])
    return out


def create(
  name: str,
  *,
  stem: str = "cifar",
  width: int = 64,
  num_classes: int | None = None,
  dtype: Any = jnp.float32,
  zero_init_residual: bool = False,
  conv_impl: str = "auto",
) -> ResNet:
  """The ResNet `name` in `ARCHITECTURES` ('resnet10', 'resnet18', 'resnet34', 'resnet50')."""
  _check("model", name, ARCHITECTURES)
  _check("stem", stem, STEMS)
  _check("conv_impl", conv_impl, CONV_IMPLS)
  block, stage_sizes = ARCHITECTURES[name]
  return ResNet(
    block=block,
    stage_sizes=stage_sizes,
    stem_type=stem,
    width=width,
    num_classes=num_classes,
    dtype=dtype,
    zero_init_residual=zero_init_residual,
    conv_impl=conv_impl,
  )


class Split(NamedTuple):
  """The halves of a split ResNet: pure functions with `flax.linen.Module.apply`'s convention.

  - `early(variables, x, *, train, mutable=False)`: images `[N, H, W, C]` → the split stage's
    output `[N, h, w, c]`.
  - `late(variables, z, *, train, mutable=False)`: that output → dict of the later stages,
    `embedding` `[N, D]` and `logits` (if the model has `num_classes`).
  Variables come first, each half taking only its own part from `split_variables`. As with
  `apply`, a `mutable` collection list makes them return `(output, updated_collections)`; in
  train mode BatchNorm updates its running statistics, so pass `mutable=['batch_stats']`.
  """

  early: Callable[..., Any]
  late: Callable[..., Any]


def split(model: ResNet, at: str) -> Split:
  """Splits `model` after stage `at` (in `SPLIT_POINTS`): `late(early(x)) == model(x)`."""
  _check("split point", at, SPLIT_POINTS)

  def early(variables, x, *, train: bool, mutable=False):
    def run(module, x):
      return module(x, train=train, stop=at)[at]

    return model.apply(variables, x, mutable=mutable, method=run)

  def late(variables, z, *, train: bool, mutable=False):
    return model.apply(variables, z, train=train, start=at, mutable=mutable)

  return Split(early, late)


def split_variables(variables: Mapping[str, Mapping], at: str) -> tuple[dict, dict]:
  """`(early, late)` variables: every collection cut into stages through `at` and the rest."""
  _check("split point", at, SPLIT_POINTS)
  early_names = STAGES[: STAGES.index(at) + 1]
  early, late = {}, {}
  for collection, tree in variables.items():
    early[collection] = {k: v for k, v in tree.items() if k in early_names}
    late[collection] = {k: v for k, v in tree.items() if k not in early_names}
  return early, late


def merge_variables(early: Mapping[str, Mapping], late: Mapping[str, Mapping]) -> dict:
  """Inverse of `split_variables`: the union of the two parts, collection by collection."""
  merged = {}
  for collection in {**early, **late}:
    a, b = early.get(collection, {}), late.get(collection, {})
    if set(a) & set(b):
      raise ValueError(f"{collection}: both parts hold {sorted(set(a) & set(b))}")
    merged[collection] = {**a, **b}
  return merged
