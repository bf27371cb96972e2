"""Tests for umm_jax.export: torchvision and detectron2 layouts of a Flax ResNet backbone.

The layout is checked against the state_dict keys and shapes of torchvision's own ResNet-18 and
ResNet-50 (recorded below from `torchvision.models.resnet18().state_dict()` of torchvision 0.29),
so it runs without torch. Where torch is importable, a plain-torch ResNet with torchvision's
module names (torchvision is not needed) loads the export with `strict=True` and must compute
the Flax model's embedding. The safetensors file is read back by an independent parser, and the
`export` stage runs through `umm_jax.main.run` on checkpoints written here.
"""

import importlib.util
import json
import pathlib
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from umm_jax import checkpoint, export, main
from umm_jax.models import resnet

# `name dim dim ...` per key (no dims: a scalar), in `state_dict()` order, fc included.
TORCHVISION_KEYS = {
  "resnet18": """
conv1.weight 64 3 7 7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked
layer1.0.conv1.weight 64 64 3 3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked
layer1.0.conv2.weight 64 64 3 3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked
layer1.1.conv1.weight 64 64 3 3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked
layer1.1.conv2.weight 64 64 3 3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked
layer2.0.conv1.weight 128 64 3 3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked
layer2.0.conv2.weight 128 128 3 3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked
layer2.0.downsample.0.weight 128 64 1 1
layer2.0.downsample.1.weight 128
layer2.0.downsample.1.bias 128
layer2.0.downsample.1.running_mean 128
layer2.0.downsample.1.running_var 128
layer2.0.downsample.1.num_batches_tracked
layer2.1.conv1.weight 128 128 3 3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked
layer2.1.conv2.weight 128 128 3 3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked
layer3.0.conv1.weight 256 128 3 3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked
layer3.0.conv2.weight 256 256 3 3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked
layer3.0.downsample.0.weight 256 128 1 1
layer3.0.downsample.1.weight 256
layer3.0.downsample.1.bias 256
layer3.0.downsample.1.running_mean 256
layer3.0.downsample.1.running_var 256
layer3.0.downsample.1.num_batches_tracked
layer3.1.conv1.weight 256 256 3 3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked
layer3.1.conv2.weight 256 256 3 3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked
layer4.0.conv1.weight 512 256 3 3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked
layer4.0.conv2.weight 512 512 3 3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked
layer4.0.downsample.0.weight 512 256 1 1
layer4.0.downsample.1.weight 512
layer4.0.downsample.1.bias 512
layer4.0.downsample.1.running_mean 512
layer4.0.downsample.1.running_var 512
layer4.0.downsample.1.num_batches_tracked
layer4.1.conv1.weight 512 512 3 3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked
layer4.1.conv2.weight 512 512 3 3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked
fc.weight 1000 512
fc.bias 1000
""",
  "resnet50": """
conv1.weight 64 3 7 7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked
layer1.0.conv1.weight 64 64 1 1
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked
layer1.0.conv2.weight 64 64 3 3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked
layer1.0.conv3.weight 256 64 1 1
layer1.0.bn3.weight 256
layer1.0.bn3.bias 256
layer1.0.bn3.running_mean 256
layer1.0.bn3.running_var 256
layer1.0.bn3.num_batches_tracked
layer1.0.downsample.0.weight 256 64 1 1
layer1.0.downsample.1.weight 256
layer1.0.downsample.1.bias 256
layer1.0.downsample.1.running_mean 256
layer1.0.downsample.1.running_var 256
layer1.0.downsample.1.num_batches_tracked
layer1.1.conv1.weight 64 256 1 1
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked
layer1.1.conv2.weight 64 64 3 3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked
layer1.1.conv3.weight 256 64 1 1
layer1.1.bn3.weight 256
layer1.1.bn3.bias 256
layer1.1.bn3.running_mean 256
layer1.1.bn3.running_var 256
layer1.1.bn3.num_batches_tracked
layer1.2.conv1.weight 64 256 1 1
layer1.2.bn1.weight 64
layer1.2.bn1.bias 64
layer1.2.bn1.running_mean 64
layer1.2.bn1.running_var 64
layer1.2.bn1.num_batches_tracked
layer1.2.conv2.weight 64 64 3 3
layer1.2.bn2.weight 64
layer1.2.bn2.bias 64
layer1.2.bn2.running_mean 64
layer1.2.bn2.running_var 64
layer1.2.bn2.num_batches_tracked
layer1.2.conv3.weight 256 64 1 1
layer1.2.bn3.weight 256
layer1.2.bn3.bias 256
layer1.2.bn3.running_mean 256
layer1.2.bn3.running_var 256
layer1.2.bn3.num_batches_tracked
layer2.0.conv1.weight 128 256 1 1
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked
layer2.0.conv2.weight 128 128 3 3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked
layer2.0.conv3.weight 512 128 1 1
layer2.0.bn3.weight 512
layer2.0.bn3.bias 512
layer2.0.bn3.running_mean 512
layer2.0.bn3.running_var 512
layer2.0.bn3.num_batches_tracked
layer2.0.downsample.0.weight 512 256 1 1
layer2.0.downsample.1.weight 512
layer2.0.downsample.1.bias 512
layer2.0.downsample.1.running_mean 512
layer2.0.downsample.1.running_var 512
layer2.0.downsample.1.num_batches_tracked
layer2.1.conv1.weight 128 512 1 1
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked
layer2.1.conv2.weight 128 128 3 3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked
layer2.1.conv3.weight 512 128 1 1
layer2.1.bn3.weight 512
layer2.1.bn3.bias 512
layer2.1.bn3.running_mean 512
layer2.1.bn3.running_var 512
layer2.1.bn3.num_batches_tracked
layer2.2.conv1.weight 128 512 1 1
layer2.2.bn1.weight 128
layer2.2.bn1.bias 128
layer2.2.bn1.running_mean 128
layer2.2.bn1.running_var 128
layer2.2.bn1.num_batches_tracked
layer2.2.conv2.weight 128 128 3 3
layer2.2.bn2.weight 128
layer2.2.bn2.bias 128
layer2.2.bn2.running_mean 128
layer2.2.bn2.running_var 128
layer2.2.bn2.num_batches_tracked
layer2.2.conv3.weight 512 128 1 1
layer2.2.bn3.weight 512
layer2.2.bn3.bias 512
layer2.2.bn3.running_mean 512
layer2.2.bn3.running_var 512
layer2.2.bn3.num_batches_tracked
layer2.3.conv1.weight 128 512 1 1
layer2.3.bn1.weight 128
layer2.3.bn1.bias 128
layer2.3.bn1.running_mean 128
layer2.3.bn1.running_var 128
layer2.3.bn1.num_batches_tracked
layer2.3.conv2.weight 128 128 3 3
layer2.3.bn2.weight 128
layer2.3.bn2.bias 128
layer2.3.bn2.running_mean 128
layer2.3.bn2.running_var 128
layer2.3.bn2.num_batches_tracked
layer2.3.conv3.weight 512 128 1 1
layer2.3.bn3.weight 512
layer2.3.bn3.bias 512
layer2.3.bn3.running_mean 512
layer2.3.bn3.running_var 512
layer2.3.bn3.num_batches_tracked
layer3.0.conv1.weight 256 512 1 1
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked
layer3.0.conv2.weight 256 256 3 3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked
layer3.0.conv3.weight 1024 256 1 1
layer3.0.bn3.weight 1024
layer3.0.bn3.bias 1024
layer3.0.bn3.running_mean 1024
layer3.0.bn3.running_var 1024
layer3.0.bn3.num_batches_tracked
layer3.0.downsample.0.weight 1024 512 1 1
layer3.0.downsample.1.weight 1024
layer3.0.downsample.1.bias 1024
layer3.0.downsample.1.running_mean 1024
layer3.0.downsample.1.running_var 1024
layer3.0.downsample.1.num_batches_tracked
layer3.1.conv1.weight 256 1024 1 1
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked
layer3.1.conv2.weight 256 256 3 3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked
layer3.1.conv3.weight 1024 256 1 1
layer3.1.bn3.weight 1024
layer3.1.bn3.bias 1024
layer3.1.bn3.running_mean 1024
layer3.1.bn3.running_var 1024
layer3.1.bn3.num_batches_tracked
layer3.2.conv1.weight 256 1024 1 1
layer3.2.bn1.weight 256
layer3.2.bn1.bias 256
layer3.2.bn1.running_mean 256
layer3.2.bn1.running_var 256
layer3.2.bn1.num_batches_tracked
layer3.2.conv2.weight 256 256 3 3
layer3.2.bn2.weight 256
layer3.2.bn2.bias 256
layer3.2.bn2.running_mean 256
layer3.2.bn2.running_var 256
layer3.2.bn2.num_batches_tracked
layer3.2.conv3.weight 1024 256 1 1
layer3.2.bn3.weight 1024
layer3.2.bn3.bias 1024
layer3.2.bn3.running_mean 1024
layer3.2.bn3.running_var 1024
layer3.2.bn3.num_batches_tracked
layer3.3.conv1.weight 256 1024 1 1
layer3.3.bn1.weight 256
layer3.3.bn1.bias 256
layer3.3.bn1.running_mean 256
layer3.3.bn1.running_var 256
layer3.3.bn1.num_batches_tracked
layer3.3.conv2.weight 256 256 3 3
layer3.3.bn2.weight 256
layer3.3.bn2.bias 256
layer3.3.bn2.running_mean 256
layer3.3.bn2.running_var 256
layer3.3.bn2.num_batches_tracked
layer3.3.conv3.weight 1024 256 1 1
layer3.3.bn3.weight 1024
layer3.3.bn3.bias 1024
layer3.3.bn3.running_mean 1024
layer3.3.bn3.running_var 1024
layer3.3.bn3.num_batches_tracked
layer3.4.conv1.weight 256 1024 1 1
layer3.4.bn1.weight 256
layer3.4.bn1.bias 256
layer3.4.bn1.running_mean 256
layer3.4.bn1.running_var 256
layer3.4.bn1.num_batches_tracked
layer3.4.conv2.weight 256 256 3 3
layer3.4.bn2.weight 256
layer3.4.bn2.bias 256
layer3.4.bn2.running_mean 256
layer3.4.bn2.running_var 256
layer3.4.bn2.num_batches_tracked
layer3.4.conv3.weight 1024 256 1 1
layer3.4.bn3.weight 1024
layer3.4.bn3.bias 1024
layer3.4.bn3.running_mean 1024
layer3.4.bn3.running_var 1024
layer3.4.bn3.num_batches_tracked
layer3.5.conv1.weight 256 1024 1 1
layer3.5.bn1.weight 256
layer3.5.bn1.bias 256
layer3.5.bn1.running_mean 256
layer3.5.bn1.running_var 256
layer3.5.bn1.num_batches_tracked
layer3.5.conv2.weight 256 256 3 3
layer3.5.bn2.weight 256
layer3.5.bn2.bias 256
layer3.5.bn2.running_mean 256
layer3.5.bn2.running_var 256
layer3.5.bn2.num_batches_tracked
layer3.5.conv3.weight 1024 256 1 1
layer3.5.bn3.weight 1024
layer3.5.bn3.bias 1024
layer3.5.bn3.running_mean 1024
layer3.5.bn3.running_var 1024
layer3.5.bn3.num_batches_tracked
layer4.0.conv1.weight 512 1024 1 1
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked
layer4.0.conv2.weight 512 512 3 3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked
layer4.0.conv3.weight 2048 512 1 1
layer4.0.bn3.weight 2048
layer4.0.bn3.bias 2048
layer4.0.bn3.running_mean 2048
layer4.0.bn3.running_var 2048
layer4.0.bn3.num_batches_tracked
layer4.0.downsample.0.weight 2048 1024 1 1
layer4.0.downsample.1.weight 2048
layer4.0.downsample.1.bias 2048
layer4.0.downsample.1.running_mean 2048
layer4.0.downsample.1.running_var 2048
layer4.0.downsample.1.num_batches_tracked
layer4.1.conv1.weight 512 2048 1 1
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked
layer4.1.conv2.weight 512 512 3 3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked
layer4.1.conv3.weight 2048 512 1 1
layer4.1.bn3.weight 2048
layer4.1.bn3.bias 2048
layer4.1.bn3.running_mean 2048
layer4.1.bn3.running_var 2048
layer4.1.bn3.num_batches_tracked
layer4.2.conv1.weight 512 2048 1 1
layer4.2.bn1.weight 512
layer4.2.bn1.bias 512
layer4.2.bn1.running_mean 512
layer4.2.bn1.running_var 512
layer4.2.bn1.num_batches_tracked
layer4.2.conv2.weight 512 512 3 3
layer4.2.bn2.weight 512
layer4.2.bn2.bias 512
layer4.2.bn2.running_mean 512
layer4.2.bn2.running_var 512
layer4.2.bn2.num_batches_tracked
layer4.2.conv3.weight 2048 512 1 1
layer4.2.bn3.weight 2048
layer4.2.bn3.bias 2048
layer4.2.bn3.running_mean 2048
layer4.2.bn3.running_var 2048
layer4.2.bn3.num_batches_tracked
fc.weight 1000 2048
fc.bias 1000
""",
}


def _recorded(name: str) -> dict[str, tuple[int, ...]]:
  rows = (line.split() for line in TORCHVISION_KEYS[name].strip().splitlines())
  return {key: tuple(int(d) for d in dims) for key, *dims in rows}


def _random_backbone(name, *, stem="imagenet", width=64, channels=3, seed=0) -> dict:
  """Backbone variables with every leaf random: He-normal kernels, BN scale, bias and statistics
  away from their initial values, so that a wrong mapping changes the output."""
  model = resnet.create(name, stem=stem, width=width)
  x = jnp.zeros((1, 32, 32, channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    kind = path[-1].key
    if kind == "kernel":
      fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
      return rng.normal(0, np.sqrt(2 / fan_out), leaf.shape).astype(np.float32)
    if kind in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _read_safetensors(path) -> tuple[dict[str, np.ndarray], dict, int]:
  """A minimal safetensors reader: (tensors, header JSON, header size)."""
  raw = pathlib.Path(path).read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8 : 8 + size])
  buffer = raw[8 + size :]
  dtypes = {"F32": "<f4", "I64": "<i8"}
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    begin, end = info["data_offsets"]
    values = np.frombuffer(buffer[begin:end], dtype=dtypes[info["dtype"]])
    tensors[name] = values.reshape(info["shape"])
  return tensors, header, size


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_layout_matches_torchvision(name):
  state_dict = export.torchvision_state_dict(_random_backbone(name))
  recorded = {k: v for k, v in _recorded(name).items() if not k.startswith("fc.")}
  assert list(state_dict) == list(recorded)  # names and torchvision's order
  assert {k: v.shape for k, v in state_dict.items()} == recorded
  for key, value in state_dict.items():
    expected = np.int64 if key.endswith("num_batches_tracked") else np.float32
    assert value.dtype == expected, key


def test_kernels_become_oihw_and_norms_keep_their_values():
  variables = _random_backbone("resnet50", stem="cifar", width=4, channels=1)
  state_dict = export.torchvision_state_dict(variables)
  params, stats = variables["params"], variables["batch_stats"]
  kernel = params["layer2"]["block0"]["conv2"]["kernel"]  # [3, 3, 8, 8], stride 2
  np.testing.assert_array_equal(state_dict["layer2.0.conv2.weight"], kernel.transpose(3, 2, 0, 1))
  assert state_dict["layer2.0.conv2.weight"][5, 2, 0, 1] == kernel[0, 1, 2, 5]
  assert state_dict["conv1.weight"].shape == (4, 1, 3, 3)  # the CIFAR stem, one channel
  shortcut = params["layer3"]["block0"]["downsample_conv"]["kernel"]
  np.testing.assert_array_equal(
    state_dict["layer3.0.downsample.0.weight"], shortcut[0, 0].T[..., None, None]
  )
  bn, bn_stats = (
    params["layer3"]["block0"]["downsample_bn"],
    stats["layer3"]["block0"]["downsample_bn"],
  )
  np.testing.assert_array_equal(state_dict["layer3.0.downsample.1.weight"], bn["scale"])
  np.testing.assert_array_equal(state_dict["layer3.0.downsample.1.bias"], bn["bias"])
  np.testing.assert_array_equal(state_dict["layer3.0.downsample.1.running_mean"], bn_stats["mean"])
  np.testing.assert_array_equal(state_dict["layer3.0.downsample.1.running_var"], bn_stats["var"])
  assert state_dict["bn1.num_batches_tracked"].shape == ()


def test_rejects_variables_that_are_not_a_backbone():
  variables = _random_backbone("resnet10", width=4)
  with_fc = {**variables, "params": {**variables["params"], "fc": {"kernel": np.zeros((32, 10))}}}
  with pytest.raises(ValueError, match=r"unexpected \['fc/kernel'\]"):
    export.torchvision_state_dict(with_fc)
  with pytest.raises(ValueError, match="batch_stats"):
    export.torchvision_state_dict({"params": variables["params"]})


def _detectron2_rename(name: str) -> str:
  """detectron2's tools/convert-torchvision-to-d2.py renaming, as its string replacements."""
  if "layer" not in name:
    name = "stem." + name
  for t in (1, 2, 3, 4):
    name = name.replace(f"layer{t}", f"res{t + 1}")
  for t in (1, 2, 3):
    name = name.replace(f"bn{t}", f"conv{t}.norm")
  return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_detectron2_names(name):
  state_dict = export.torchvision_state_dict(_random_backbone(name, width=8))
  d2 = export.detectron2_checkpoint(state_dict)
  assert d2["__author__"] == "umm_jax" and d2["matching_heuristics"] is True
  expected = {
    _detectron2_rename(k): v for k, v in state_dict.items() if "num_batches_tracked" not in k
  }
  assert list(d2["model"]) == list(expected)
  for key, value in expected.items():
    assert isinstance(d2["model"][key], np.ndarray)
    np.testing.assert_array_equal(d2["model"][key], value)
  names = set(d2["model"])
  assert {"stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias"} <= names
  assert {"stem.conv1.norm.running_mean", "stem.conv1.norm.running_var"} <= names
  assert {"res2.0.conv1.weight", "res2.0.conv2.norm.running_var", "res5.1.conv2.norm.bias"} <= names
  assert {"res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean"} <= names
  assert ("res2.0.shortcut.weight" in names) == (name == "resnet50")  # 64 -> 256 channels
  assert ("res2.0.conv3.norm.weight" in names) == (name == "resnet50")


def test_safetensors_round_trip(tmp_path):
  state_dict = export.torchvision_state_dict(_random_backbone("resnet18", width=4))
  path = tmp_path / "backbone.safetensors"
  export.write_safetensors(path, state_dict, metadata={"format": "pt", "model": "resnet18"})
  tensors, header, size = _read_safetensors(path)
  assert size % 8 == 0
  assert header["__metadata__"] == {"format": "pt", "model": "resnet18"}
  assert list(tensors) == list(state_dict)
  for key, value in state_dict.items():
    assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
    np.testing.assert_array_equal(tensors[key], value)
  # Offsets tile the data buffer without gaps, in order, up to the end of the file.
  offsets = [header[k]["data_offsets"] for k in state_dict]
  assert offsets[0][0] == 0
  assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
  assert offsets[-1][1] == path.stat().st_size - 8 - size
  with pytest.raises(ValueError, match="float64"):
    export.write_safetensors(path, {"x": np.zeros(2)})
  with pytest.raises(ValueError, match="strings"):
    export.write_safetensors(path, {"x": np.zeros(2, np.float32)}, metadata={"width": 64})


def test_detectron2_options():
  kwargs = dict(channels=3, mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.1], weights="w.pkl")
  options = export.detectron2_options("resnet50", stem="imagenet", width=64, **kwargs)
  pairs = dict(zip(options[::2], options[1::2], strict=True))
  assert pairs["MODEL.WEIGHTS"] == "w.pkl"
  assert pairs["MODEL.RESNETS.DEPTH"] == "50"
  assert pairs["MODEL.RESNETS.STRIDE_IN_1X1"] == "False"
  assert pairs["MODEL.RESNETS.RES2_OUT_CHANNELS"] == "256"
  assert pairs["MODEL.PIXEL_MEAN"] == "[127.500, 102.000, 76.500]"
  assert pairs["MODEL.PIXEL_STD"] == "[63.750, 51.000, 25.500]"
  assert pairs["INPUT.FORMAT"] == "RGB"
  r18 = export.detectron2_options("resnet18", stem="imagenet", width=64, **kwargs)
  assert dict(zip(r18[::2], r18[1::2], strict=True))["MODEL.RESNETS.RES2_OUT_CHANNELS"] == "64"
  assert export.detectron2_options("resnet18", stem="cifar", width=64, **kwargs) is None
  assert export.detectron2_options("resnet18", stem="imagenet", width=32, **kwargs) is None
  assert export.detectron2_options("resnet10", stem="imagenet", width=64, **kwargs) is None
  assert export.detectron2_options("resnet50", stem="imagenet", width=32, **kwargs) is not None


def _torch_resnet(torch, block: str, stage_sizes, *, stem: str, width: int, channels: int):
  """A ResNet in plain torch with torchvision's module names, returning the pooled features."""
  nn = torch.nn

  def conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)

  class Block(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      shapes = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
      if block == "bottleneck":
        shapes = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, 4 * planes, 1, 1)]
      for i, (a, b, k, s) in enumerate(shapes, start=1):
        setattr(self, f"conv{i}", conv(a, b, k, s))
        setattr(self, f"bn{i}", nn.BatchNorm2d(b))
      self.n, cout = len(shapes), shapes[-1][1]
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
      self.out = cout

    def forward(self, x):
      y = x
      for i in range(1, self.n + 1):
        y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
        y = torch.relu(y) if i < self.n else y
      return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      k, s = (7, 2) if stem == "imagenet" else (3, 1)
      self.conv1, self.bn1 = conv(channels, width, k, s), nn.BatchNorm2d(width)
      self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
      cin = width
      for i, n in enumerate(stage_sizes):
        blocks = []
        for j in range(n):
          blocks.append(Block(cin, width * 2**i, 2 if i and not j else 1))
          cin = blocks[-1].out
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for i in range(1, 5):
        x = getattr(self, f"layer{i}")(x)
      return x.mean(dim=(2, 3))

  return ResNet()


@pytest.mark.parametrize(
  "name, stem, width, channels, size",
  [("resnet18", "cifar", 8, 3, 16), ("resnet50", "imagenet", 4, 1, 32)],
)
def test_torch_model_loads_the_export_and_computes_the_same_embedding(
  tmp_path, name, stem, width, channels, size
):
  torch = pytest.importorskip("torch")
  variables = _random_backbone(name, stem=stem, width=width, channels=channels)
  files = export.export_backbone(variables, tmp_path, metadata={"format": "pt"})
  block, stage_sizes = resnet.ARCHITECTURES[name]
  net = _torch_resnet(torch, block, stage_sizes, stem=stem, width=width, channels=channels)
  net.load_state_dict(torch.load(files["torch"]), strict=True)
  x = np.random.default_rng(1).normal(size=(2, size, size, channels)).astype(np.float32)
  with torch.no_grad():
    got = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  model = resnet.create(name, stem=stem, width=width)
  want = np.asarray(model.apply(variables, x, train=False)["embedding"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _save_backbone(directory, step: int, variables) -> None:
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(step, {"online": {"backbone": variables}}, metadata={"step": step})


def test_export_stage_writes_every_encoder_of_the_work_dir(tmp_path):
  config = test_config.get_config()  # resnet10, width 8, CIFAR stem, synthetic data
  config.stages = ("export",)
  with pytest.raises(FileNotFoundError, match="run the 'pretrain' stage first"):
    main.run(config, tmp_path)
  baseline = _random_backbone("resnet10", stem="cifar", width=8, seed=1)
  tuned = _random_backbone("resnet10", stem="cifar", width=8, seed=2)
  _save_backbone(tmp_path / "checkpoints", 8, baseline)
  _save_backbone(tmp_path / "umm" / "umm" / "checkpoints", 12, tuned)

  main.run(config, tmp_path)
  for variables, out, step in [(baseline, "export", 8), (tuned, "export/umm/umm", 12)]:
    summary = json.loads((tmp_path / out / "export.json").read_text())
    assert summary["step"] == step
    assert summary["model"] == {"name": "resnet10", "stem": "cifar", "width": 8, "channels": 3}
    assert len(summary["input_mean"]) == len(summary["input_std"]) == 3
    assert summary["detectron2_options"] is None  # no stock detectron2 ResNet-10
    tensors, header, _ = _read_safetensors(tmp_path / out / "backbone.safetensors")
    assert header["__metadata__"]["checkpoint"] == summary["checkpoint"]
    expected = export.torchvision_state_dict(variables)
    for key, value in expected.items():
      np.testing.assert_array_equal(tensors[key], value)
    with open(tmp_path / out / "backbone_d2.pkl", "rb") as f:
      d2 = pickle.load(f)
    np.testing.assert_array_equal(
      d2["model"]["res5.0.shortcut.weight"], expected["layer4.0.downsample.0.weight"]
    )
    has_torch = importlib.util.find_spec("torch") is not None
    assert ("torch" in summary["files"]) == has_torch
    assert (tmp_path / out / "backbone.pth").exists() == has_torch


def test_sources_follow_the_umm_stage_layout(tmp_path):
  assert export.sources(tmp_path) == []
  for sub in ("checkpoints", "umm/umm/checkpoints", "umm/no_js/checkpoints", "umm/x"):
    (tmp_path / sub).mkdir(parents=True)
  assert export.sources(tmp_path) == ["checkpoints", "umm/no_js/checkpoints", "umm/umm/checkpoints"]
