"""Trained backbones in PyTorch's layouts: torchvision's ResNet `state_dict` and detectron2's.

`torchvision_state_dict(variables)` turns the Flax variables of an `umm_jax.models.resnet`
backbone (`{'params', 'batch_stats'}`, as `pretrain.load_backbone` returns them) into the
`state_dict` of `torchvision.models.ResNet`: `conv1.weight`, `bn1.{weight, bias, running_mean,
running_var, num_batches_tracked}`, `layer1.0.conv1.weight`, ..., `layer2.0.downsample.0.weight`
(the shortcut's 1×1 conv) and `layer2.0.downsample.1.*` (its BN), in torchvision's order. Conv
kernels go from Flax's `[kh, kw, in, out]` (HWIO) to PyTorch's `[out, in, kh, kw]` (OIHW); BN's
`scale`/`bias`/`mean`/`var` become `weight`/`bias`/`running_mean`/`running_var`, and
`num_batches_tracked` is 0 (read only by BatchNorm without momentum; torchvision uses 0.1). The
backbone has no classifier, so the dict has no `fc.*`: load it with `strict=False`, or into a
model whose `fc` was removed.

`detectron2_checkpoint(state_dict)` renames that dict as detectron2's
`tools/convert-torchvision-to-d2.py` does (`stem.conv1.weight`, `stem.conv1.norm.*`,
`res2.0.conv1.weight`, `res2.0.conv1.norm.*`, `res3.0.shortcut.weight`, `res3.0.shortcut.norm.*`,
...; no `num_batches_tracked`) into the pickle detectron2 reads as `MODEL.WEIGHTS`:
`{'model': {name: np.ndarray}, '__author__': 'umm_jax', 'matching_heuristics': True}`.
torchvision ResNets are v1.5 (the stride on the 3×3 conv), so detectron2 needs
`MODEL.RESNETS.STRIDE_IN_1X1 False`; `detectron2_options` lists every key to set.

What the consumer must match, since the names are the same whatever the model was:
- the stem: a 'cifar' backbone exports its 3×3/1 `conv1` under the same names and has no
  max-pool; in torchvision replace `model.conv1` by `Conv2d(c, width, 3, 1, 1, bias=False)` and
  `model.maxpool` by `Identity()`; stock detectron2 has no such stem (register one).
- the width: torchvision and detectron2's R18/R34 are width 64 only; other widths need a model
  built with them (detectron2's R50: `STEM_OUT_CHANNELS`, `RES2_OUT_CHANNELS`, `WIDTH_PER_GROUP`).
- the input: `conv1` has the training images' channels (1 for Fashion-MNIST) and expects
  `(x / 255 - mean) / std` with the per-channel `mean`/`std` of the pre-training set, recorded
  in `export.json` (detectron2: `PIXEL_MEAN = 255·mean`, `PIXEL_STD = 255·std`, `FORMAT RGB`).

The `export` stage (`run_stage`) exports the newest checkpoint of `<workdir>/checkpoints` into
`<workdir>/export/` and, when UMM ran, that of each variant's `<workdir>/umm/<variant>/checkpoints`
into `<workdir>/export/umm/<variant>/` (`sources`):
`backbone.safetensors` (torchvision layout, written here with NumPy), `backbone.pth` (the same
dict through `torch.save`, when torch is importable; torch is not a dependency),
`backbone_d2.pkl` (detectron2) and `export.json` (source checkpoint, model, input normalisation,
files, detectron2 options).
"""

import io
import json
import os
import pathlib
import pickle
import re
import struct
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from umm_jax import checkpoint, data, pretrain, umm_stage
from umm_jax.models import resnet

EXPORT_DIR = "export"
SAFETENSORS_FILE = "backbone.safetensors"
TORCH_FILE = "backbone.pth"
DETECTRON2_FILE = "backbone_d2.pkl"
SUMMARY_FILE = "export.json"
# Models stock detectron2 builds (MODEL.RESNETS.DEPTH); ResNet-10 is not among them.
DETECTRON2_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
_DOWNSAMPLE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def _modules(params: Mapping) -> list[tuple[str, tuple[str, ...]]]:
  """`(torchvision module name, Flax module path)` of every conv and BN, in torchvision's order."""
  modules = [("conv1", ("stem", "conv1")), ("bn1", ("stem", "bn1"))]
  for stage in resnet.STAGES[1:]:
    for i in range(len(params[stage])):
      block = params[stage][f"block{i}"]
      names = [n for j in (1, 2, 3) if f"conv{j}" in block for n in (f"conv{j}", f"bn{j}")]
      names += [n for n in _DOWNSAMPLE if n in block]
      modules += [(f"{stage}.{i}.{_DOWNSAMPLE.get(n, n)}", (stage, f"block{i}", n)) for n in names]
  return modules


def _is_conv(path: tuple[str, ...]) -> bool:
  return re.fullmatch(r"conv\d|downsample_conv", path[-1]) is not None


def _expected_leaves(modules) -> tuple[set, set]:
  """The Flax `params` and `batch_stats` leaf paths that `modules` account for."""
  params, stats = set(), set()
  for _, path in modules:
    if _is_conv(path):
      params.add((*path, "kernel"))
    else:
      params |= {(*path, "scale"), (*path, "bias")}
      stats |= {(*path, "mean"), (*path, "var")}
  return params, stats


def _check_leaves(kind: str, found: set, expected: set) -> None:
  if found != expected:
    extra = sorted("/".join(p) for p in found - expected)
    missing = sorted("/".join(p) for p in expected - found)
    raise ValueError(
      f"Not a umm_jax ResNet backbone's {kind}: unexpected {extra}, missing {missing}"
    )


def torchvision_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
  """The torchvision ResNet `state_dict` (NumPy, float32; int64 counters) of a Flax backbone.

  Args:
    variables: `{'params', 'batch_stats'}` of an `umm_jax.models.resnet.ResNet` without
      classifier (JAX or NumPy leaves).

  Raises:
    ValueError: naming the unexpected and missing leaves when the trees are not such a backbone.
  """
  try:
    params, stats = variables["params"], variables["batch_stats"]
    modules = _modules(params)
  except (KeyError, TypeError) as e:
    raise ValueError(f"Not a umm_jax ResNet backbone's variables (missing {e})") from e
  expected_params, expected_stats = _expected_leaves(modules)
  flat_params, flat_stats = traverse_util.flatten_dict(params), traverse_util.flatten_dict(stats)
  _check_leaves("params", set(flat_params), expected_params)
  _check_leaves("batch_stats", set(flat_stats), expected_stats)

  def array(tree, *path):
    return np.array(tree[path], dtype=np.float32)

  out = {}
  for name, path in modules:
    if _is_conv(path):
      out[f"{name}.weight"] = np.ascontiguousarray(
        array(flat_params, *path, "kernel").transpose(3, 2, 0, 1)
      )
      continue
    out[f"{name}.weight"] = array(flat_params, *path, "scale")
    out[f"{name}.bias"] = array(flat_params, *path, "bias")
    out[f"{name}.running_mean"] = array(flat_stats, *path, "mean")
    out[f"{name}.running_var"] = array(flat_stats, *path, "var")
    out[f"{name}.num_batches_tracked"] = np.array(0, dtype=np.int64)
  return out


def detectron2_name(name: str) -> str:
  """detectron2's ResNet name of torchvision's `name`, e.g. 'layer1.0.bn2.weight' ->
  'res2.0.conv2.norm.weight' and 'bn1.bias' -> 'stem.conv1.norm.bias' (the renaming of
  detectron2's `tools/convert-torchvision-to-d2.py`)."""
  if not name.startswith("layer"):
    name = f"stem.{name}"
  name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
  name = re.sub(r"\bbn(\d)\b", r"conv\1.norm", name)
  return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(state_dict: Mapping[str, np.ndarray]) -> dict:
  """The detectron2 `MODEL.WEIGHTS` pickle's content for a torchvision `state_dict`.

  `matching_heuristics` lets detectron2 match the names to its model's by suffix (e.g. under
  `backbone.bottom_up.` in an FPN); `num_batches_tracked` is dropped (its BN has none).
  """
  model = {
    detectron2_name(name): value
    for name, value in state_dict.items()
    if not name.endswith(".num_batches_tracked")
  }
  return {"model": model, "__author__": "umm_jax", "matching_heuristics": True}


def write_safetensors(
  path: str | os.PathLike,
  tensors: Mapping[str, np.ndarray],
  *,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes `tensors` in the safetensors format, with NumPy only.

  The file is an unsigned little-endian 8-byte header size N, N bytes of JSON (`{name: {'dtype',
  'shape', 'data_offsets': [begin, end]}, '__metadata__': {str: str}}`, padded with spaces to a
  multiple of 8 bytes), then every tensor's little-endian C-order bytes, back to back in the
  header's order, at its offsets (counted from the end of the header).

  Raises:
    ValueError: a dtype other than float32 / int64, or metadata values that are not strings.
  """
  header, offset = {}, 0
  for name, value in tensors.items():
    if value.dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(
        f"{name}: dtype {value.dtype} not in {sorted(map(str, _SAFETENSORS_DTYPES))}"
      )
    dtype = _SAFETENSORS_DTYPES[value.dtype]
    header[name] = {
      "dtype": dtype,
      "shape": list(value.shape),
      "data_offsets": [offset, offset + value.nbytes],
    }
    offset += value.nbytes
  if metadata:
    if not all(isinstance(v, str) for v in metadata.values()):
      raise ValueError(f"safetensors metadata values must be strings, got {dict(metadata)}")
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with epath.Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for value in tensors.values():
      f.write(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes())


def save_torch(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> bool:
  """`torch.save` of `state_dict` as tensors if torch is importable; returns whether it wrote.

  Without torch a stale file at `path` is removed, so it never disagrees with the other files.
  torch opens a path as a local file, so it saves into memory and epath writes the bytes (to a
  local path or a URI alike).
  """
  path = epath.Path(path)
  try:
    import torch
  except ImportError:
    path.unlink(missing_ok=True)
    return False
  buffer = io.BytesIO()
  torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, buffer)
  path.write_bytes(buffer.getvalue())
  return True


def detectron2_options(
  model: str, *, stem: str, width: int, channels: int, mean, std, weights: str
) -> list[str] | None:
  """detectron2 config overrides (`KEY VALUE ...`, as `train_net.py` takes them) for an export.

  `None` where stock detectron2 cannot build the backbone: ResNet-10, the CIFAR stem, inputs
  other than RGB, or R18/R34 at a width other than 64.
  """
  basic = resnet.ARCHITECTURES.get(model, ("",))[0] == "basic"
  if (
    model not in DETECTRON2_DEPTHS or stem != "imagenet" or channels != 3 or (basic and width != 64)
  ):
    return None
  expansion = 1 if basic else 4
  as_list = lambda values: "[" + ", ".join(f"{255 * float(v):.3f}" for v in values) + "]"
  return [
    *("MODEL.WEIGHTS", weights),
    *("MODEL.PIXEL_MEAN", as_list(mean), "MODEL.PIXEL_STD", as_list(std), "INPUT.FORMAT", "RGB"),
    *("MODEL.RESNETS.DEPTH", str(DETECTRON2_DEPTHS[model])),
    *("MODEL.RESNETS.STRIDE_IN_1X1", "False"),
    *("MODEL.RESNETS.STEM_OUT_CHANNELS", str(width)),
    *("MODEL.RESNETS.RES2_OUT_CHANNELS", str(width * expansion)),
    *("MODEL.RESNETS.WIDTH_PER_GROUP", str(width)),
  ]


def export_backbone(
  variables: Mapping, directory: str | os.PathLike, *, metadata: Mapping[str, str]
) -> dict[str, str]:
  """Writes `backbone.safetensors`, `backbone.pth` (with torch) and `backbone_d2.pkl` of
  `variables` into `directory` (created); returns `{format: path}` of the files written.

  `metadata` (strings) goes into the safetensors header.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  state_dict = torchvision_state_dict(variables)
  files = {"safetensors": directory / SAFETENSORS_FILE, "detectron2": directory / DETECTRON2_FILE}
  write_safetensors(files["safetensors"], state_dict, metadata=metadata)
  with files["detectron2"].open("wb") as f:
    pickle.dump(detectron2_checkpoint(state_dict), f)
  if save_torch(directory / TORCH_FILE, state_dict):
    files["torch"] = directory / TORCH_FILE
  return {kind: str(path) for kind, path in files.items()}


def sources(workdir: str | os.PathLike) -> list[str]:
  """The checkpoint directories in `workdir` (relative) whose newest checkpoint is exported.

  Those of `umm_stage.encoders`: pre-training's `checkpoints` and each UMM variant's
  `umm/<variant>/checkpoints`; each one exports into `export/<its parent>`.
  """
  workdir = epath.Path(workdir)
  return [str(p.relative_to(workdir)) for p in umm_stage.encoders(workdir).values()]


def _latest_step(directory: epath.Path) -> int | None:
  if not directory.is_dir():
    return None
  with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.latest_step()


def run_stage(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """The `export` stage: the newest checkpoint of each of `sources(workdir)`, exported.

  Every process reads; process 0 writes. Returns `{source: summary}`, each summary also written
  as `export.json` beside its files.

  Raises:
    FileNotFoundError: when no source holds a checkpoint.
  """
  workdir = epath.Path(workdir)
  steps = {source: _latest_step(workdir / source) for source in sources(workdir)}
  steps = {source: step for source, step in steps.items() if step is not None}
  if not steps:
    raise FileNotFoundError(
      f"export: no checkpoint in {workdir / pretrain.CHECKPOINT_DIR} nor under "
      f"{workdir / umm_stage.UMM_DIR}; run the 'pretrain' stage first"
    )
  mean, std = data.load(config.data, config.train.split).channel_stats()
  cfg = config.model
  summaries = {}
  for source, step in steps.items():
    with checkpoint.Checkpointer(workdir / source, read_only=True) as ckpt:
      variables, _ = pretrain.load_backbone(ckpt, step)
    out = workdir / EXPORT_DIR / pathlib.PurePath(source).parent
    channels = int(np.shape(variables["params"]["stem"]["conv1"]["kernel"])[2])
    source_path = str(workdir / source / str(step))
    summary = {
      "checkpoint": source_path,
      "step": step,
      "model": {"name": cfg.name, "stem": cfg.stem, "width": cfg.width, "channels": channels},
      # The backbone's input: (images / 255 - mean) / std, per channel.
      "input_mean": [float(v) for v in mean],
      "input_std": [float(v) for v in std],
    }
    if jax.process_index() == 0:
      metadata = {"format": "pt", "checkpoint": source_path, "model": cfg.name, "stem": cfg.stem}
      summary["files"] = export_backbone(
        variables, out, metadata={**metadata, "width": str(cfg.width)}
      )
      summary["detectron2_options"] = detectron2_options(
        cfg.name, stem=cfg.stem, width=cfg.width, channels=channels, mean=mean, std=std,
        weights=summary["files"]["detectron2"],
      )  # fmt: skip
      (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
      logging.info("export: %s step %d -> %s", source, step, out)
    summaries[source] = summary
  return summaries
