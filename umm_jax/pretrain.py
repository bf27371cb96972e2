"""The `pretrain` stage: self-supervised pre-training over a device mesh, resumable.

Reads top to bottom: `build` turns the config into the pieces of a run (model, heads, method,
optimisers, the jitted step); `pretrain` loads the data, restores the newest checkpoint of the
work dir if there is one, and loops over epochs. Each process reads its own slice of every
global batch (`data.batches`), which `parallel.global_batch` assembles into one batch-sharded
array; the state is replicated and donated to the step.

Written to the work dir: `checkpoints/<step>` every `train.checkpoint_every_epochs` epochs and
at the end (all kept unless `train.max_to_keep`), `metrics.jsonl` (one JSON object per log
interval and per evaluation) and TensorBoard events; the work dir is a local path or a URI such
as `gs://bucket/run` (`MetricsLog` says how each is written). Resume order: the newest
checkpoint gives the step; the epoch and the position inside it follow from it; the data order
is a function of `(seed, epoch)` and the step's key of `(seed, step)`, so a resumed run
reproduces the uninterrupted one. SIGINT and SIGTERM (pre-emption) save a checkpoint at the
current step before the run stops.
"""

import functools
import json
import math
import os
import signal
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
from absl import logging
from etils import epath

from umm_jax import checkpoint, data, methods, optim, parallel, train
from umm_jax.models import heads as heads_lib
from umm_jax.models import resnet

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class Run(NamedTuple):
  """Everything a pre-training run (or a reader of its checkpoints) needs besides the data."""

  model: resnet.ResNet
  heads: Any
  method: Any
  hp: dict
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  probe_tx: optax.GradientTransformation
  global_batch: int
  steps_per_epoch: int
  total_steps: int
  input_shape: tuple[int, int, int]
  num_classes: int


def create_model(config: ml_collections.ConfigDict) -> resnet.ResNet:
  return resnet.create(
    config.model.name,
    stem=config.model.stem,
    width=config.model.width,
    dtype=jnp.dtype(config.model.dtype),
  )


def build(config: ml_collections.ConfigDict, train_set: data.Dataset) -> Run:
  """The pieces of a run on `train_set` as `config` describes it."""
  method = methods.get(config.method.name)
  hp = dict(config.method[config.method.name])
  steps_per_epoch = data.steps_per_epoch(len(train_set.labels), config.train.batch_size)
  # Methods that track every image (BCL-I) or act once an epoch (SDCLR, BCL-I) declare these.
  for key, value in (("num_samples", len(train_set.labels)), ("steps_per_epoch", steps_per_epoch)):
    if key in hp and hp[key] != value:
      raise ValueError(
        f"config.method.{method.name}.{key} = {hp[key]}, but the training set gives {value} "
        f"({len(train_set.labels)} images, batch {config.train.batch_size}): set "
        f"--config.method.{method.name}.{key}={value}"
      )
  total_steps = steps_per_epoch * config.train.epochs
  tx, schedule = optim.create(
    config.optim,
    family=method.optimizer,
    global_batch=config.train.batch_size,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
  )
  size = config.data.image_size
  return Run(
    model=create_model(config),
    heads=method.heads(hp),
    method=method,
    hp=hp,
    tx=tx,
    schedule=schedule,
    probe_tx=optax.sgd(config.train.probe_lr, momentum=0.9),
    global_batch=config.train.batch_size,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
    input_shape=(size, size, train_set.images.shape[-1]),
    num_classes=train_set.num_classes,
  )


def init_state(run: Run, key: jax.Array) -> train.TrainState:
  """The run's initial state, built by one jitted function (op by op, every initialiser and
  optimiser-state leaf would compile on its own: hundreds of small compilations)."""
  init = functools.partial(
    train.init_state,
    model=run.model,
    heads=run.heads,
    method=run.method,
    hp=run.hp,
    tx=run.tx,
    input_shape=run.input_shape,
    num_classes=run.num_classes,
    probe_tx=run.probe_tx,
  )
  return jax.jit(init)(key)


def load_backbone(ckpt: checkpoint.Checkpointer, step: int) -> tuple[dict, dict]:
  """The backbone variables (`state.online['backbone']`, NumPy) and metadata of `step`.

  Reads any checkpoint of a `TrainState` (pre-training or UMM) without building a target, so a
  notebook or another stage can load an encoder from a folder of checkpoints.

  Raises:
    ValueError: naming the checkpoint's path, when the step is missing, unreadable (corrupt or
      incomplete files) or holds no `TrainState`.
  """
  path = os.path.join(ckpt.directory, str(step))
  steps = ckpt.all_steps()
  if step not in steps:
    raise ValueError(f"Missing checkpoint {path}: no step {step} in {ckpt.directory} ({steps})")
  try:
    raw, meta = ckpt.restore_raw(step), ckpt.metadata(step)
  except Exception as e:  # orbax, TensorStore and json raise many kinds; all mean "unreadable"
    raise ValueError(
      f"Corrupt or incomplete checkpoint {path} (step {step}): {type(e).__name__}: {e}"
    ) from e
  try:
    backbone = raw["online"]["backbone"]
    variables = {"params": backbone["params"], "batch_stats": backbone["batch_stats"]}
  except (KeyError, TypeError) as e:
    raise ValueError(
      f"Checkpoint {path} holds no state.online['backbone'] {{params, batch_stats}} of a "
      f"TrainState (missing {e})"
    ) from e
  return variables, meta


def make_probe_eval(run: Run, mean: np.ndarray, std: np.ndarray):
  """Jitted `(state, images uint8 [n, H, W, C]) -> logits [n, classes]` of the online probe.

  Images are resized to the model's input size (no augmentation) and standardised.
  """
  size = run.input_shape[0]

  @jax.jit
  def logits(state: train.TrainState, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
    out = run.model.apply(state.online["backbone"], (x - mean) / std, train=False)
    return heads_lib.LinearClassifier(run.num_classes).apply(state.probe, out["embedding"])

  return logits


def probe_accuracy(logits_fn, state, dataset: data.Dataset, *, batch_size: int, mesh) -> dict:
  """Top-1 and top-5 test accuracy of the online probe over the whole of `dataset`."""
  correct1 = correct5 = 0
  n = len(dataset.labels)
  per_device = -(-batch_size // mesh.devices.size)
  batch_size = per_device * mesh.devices.size
  for start in range(0, n, batch_size):
    images = dataset.images[start : start + batch_size]
    labels = dataset.labels[start : start + batch_size]
    pad = batch_size - len(images)  # a fixed shape: one compilation for the last batch too
    padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    scores = parallel.fetch(logits_fn(state, jax.device_put(padded, parallel.batch_sharding(mesh))))
    top5 = np.argsort(-scores[: len(labels)], axis=-1)[:, :5]
    correct1 += int(np.sum(top5[:, 0] == labels))
    correct5 += int(np.sum(np.any(top5 == labels[:, None], axis=-1)))
  return {"probe_top1": correct1 / n, "probe_top5": correct5 / n}


class StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop checks between steps (then saves and stops)."""

  def __init__(self):
    self.signal = None

  def __enter__(self):
    self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in self._previous:
      signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc_info):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


class MetricsLog:
  """`metrics.jsonl` and TensorBoard events (`tensorboard/`), written by process 0 only.

  On resume, JSONL records past the restored step are cut and TensorBoard is told to purge its
  events past it, so an interrupted run's tail is not counted twice.

  A local work dir is appended to. An object store (any URI: `gs://...`) has no append and no
  partial write, so there the records are kept in memory and every write uploads the whole
  `metrics.jsonl`; an upload replaces the object at once, so readers never see half a file.
  TensorBoard: tensorboardX writes `gs://` and `s3://` only through google-cloud-storage or boto3
  and treats any other URI as a local path, so for a remote work dir it writes into a local
  temporary directory and each of its events files is uploaded whole to `tensorboard/` after
  every write (the events the writer has flushed by then) and at exit (all of them).
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int):
    workdir = epath.Path(workdir)
    self.path = workdir / METRICS_FILE
    self.writer = None
    if jax.process_index() != 0:
      return
    kept = []
    if self.path.exists():
      lines = self.path.read_text().splitlines()
      kept = [line + "\n" for line in lines if json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(kept))
    remote = "://" in os.fspath(workdir)
    self._lines = kept if remote else None  # the file's content, where it is rewritten whole
    self._events = workdir / TENSORBOARD_DIR
    self._local_events = tempfile.TemporaryDirectory(prefix="umm_events_") if remote else None
    self.writer = tensorboardX.SummaryWriter(
      self._local_events.name if remote else os.fspath(self._events),
      purge_step=resume_step + 1 if resume_step else None,
    )

  def write(self, split: str, record: dict) -> None:
    if self.writer is None:
      return
    line = json.dumps({"split": split, **record}) + "\n"
    if self._lines is None:
      with self.path.open("a") as f:
        f.write(line)
    else:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    for key, value in record.items():
      if key != "step":
        self.writer.add_scalar(f"{split}/{key}", value, record["step"])
    self.writer.flush()
    self._upload_events()

  def _upload_events(self) -> None:
    if self._local_events is None:
      return
    self._events.mkdir(parents=True, exist_ok=True)
    for events in epath.Path(self._local_events.name).iterdir():
      (self._events / events.name).write_bytes(events.read_bytes())

  def train(self, history: list[dict], step: int, run: Run, *, timed: int, seconds: float):
    """Writes and prints the mean of the step metrics in `history`, with speed and ETA.

    `timed` steps took `seconds` (the first step's compilation is not among them).
    """
    record = mean_metrics(history)
    record.update(step=step, epoch=step / run.steps_per_epoch, lr=float(run.schedule(step - 1)))
    speed = ""
    if timed:
      record["images_per_second"] = run.global_batch * timed / seconds
      eta = (run.total_steps - step) * seconds / timed
      speed = f" {record['images_per_second']:.0f} img/s eta {eta:.0f}s"
    self.write("train", record)
    logging.info(
      "step %d/%d epoch %.2f loss %.4f probe_acc %.3f lr %.3g%s",
      *(step, run.total_steps, record["epoch"], record["loss"], record["probe_acc"]),
      *(record["lr"], speed),
    )

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    if self.writer is not None:
      self.writer.close()
      self._upload_events()
      if self._local_events is not None:
        self._local_events.cleanup()


def mean_metrics(history: list[dict]) -> dict:
  host = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def pretrain(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> train.TrainState:
  """Pre-trains (or resumes) the encoder of `config` in `workdir`; returns the final state."""
  workdir = epath.Path(workdir)
  cfg = config.train
  mesh = parallel.make_mesh()
  parallel.check_global_batch(cfg.batch_size, mesh)
  train_set = data.load(config.data, cfg.split)
  test_set = data.load(config.data, "test")
  run = build(config, train_set)
  mean, std = train_set.channel_stats()

  root = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(root)
  state = parallel.replicate(init_state(run, init_key), mesh)
  max_to_keep = cfg.max_to_keep or None
  ckpt = checkpoint.Checkpointer(workdir / CHECKPOINT_DIR, max_to_keep=max_to_keep)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, state)
    logging.info("resuming from step %d (%s)", start, ckpt.directory)
  log = MetricsLog(workdir, resume_step=start)

  step_fn = train.make_train_step(
    model=run.model,
    heads=run.heads,
    method=run.method,
    hp=run.hp,
    tx=run.tx,
    probe_tx=run.probe_tx,
    num_classes=run.num_classes,
    image_size=config.data.image_size,
    mean=jnp.asarray(mean),
    std=jnp.asarray(std),
    total_steps=run.total_steps,
  )
  step_fn = jax.jit(step_fn, donate_argnums=0, out_shardings=parallel.replicated(mesh))
  probe_logits = make_probe_eval(run, mean, std)

  def save(state, step: int, epoch: float, metrics: dict) -> None:
    ckpt.save(step, state, metadata={"step": step, "epoch": epoch, **metrics})

  with ckpt, log:
    return train_loop(
      state, step_fn, step_key, config=config, run=run, mesh=mesh, data_sets=(train_set, test_set),
      epochs=cfg.epochs, checkpoint_every_epochs=cfg.checkpoint_every_epochs,
      probe_logits=probe_logits, log=log, start=start, save=save,
      last_saved=ckpt.latest_step,
    )  # fmt: skip


def train_loop(
  state: train.TrainState,
  step_fn,
  step_key: jax.Array,
  *,
  config: ml_collections.ConfigDict,
  run: Run,
  mesh,
  data_sets: tuple[data.Dataset, data.Dataset],
  epochs: int,
  checkpoint_every_epochs: int,
  probe_logits,
  log: MetricsLog,
  start: int,
  save,
  last_saved,
  name: str = "",
) -> train.TrainState:
  """The epoch loop of pre-training and UMM, from step `start` to `epochs` epochs.

  Feeds `step_fn(state, batch, step_key) -> (state, metrics)` with this process's slice of each
  global batch of `data_sets[0]` (`image`, `label`, and `index` when the method reads it; order a
  function of `(config.seed, epoch)`, resumed at `start`); logs every `config.train.
  log_every_steps` steps through `log` (NaN guard first); tests the online probe on
  `data_sets[1]` every `config.train.eval_every_epochs` epochs; calls `save(state, step, epoch,
  metrics)` every `checkpoint_every_epochs` epochs, at the end, and on SIGINT/SIGTERM (then
  raises `KeyboardInterrupt`). `last_saved()` is the newest saved step. `name` prefixes the log
  lines ('UMM ').
  """
  cfg = config.train
  train_set, test_set = data_sets
  history, tic, timed, step = [], time.perf_counter(), 0, start
  with StopRequest() as stop:
    for epoch in range(start // run.steps_per_epoch, epochs):
      batches = data.batches(
        train_set,
        global_batch=cfg.batch_size,
        seed=config.seed,
        epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=step % run.steps_per_epoch,
        with_index="index" in run.method.batch_keys,
      )
      for arrays in data.prefetch(batches):
        names = ("image", "label", "index")[: len(arrays)]
        batch = {k: parallel.global_batch(a, mesh) for k, a in zip(names, arrays, strict=True)}
        state, metrics = step_fn(state, batch, step_key)
        history.append(metrics)
        step += 1
        timed += 1
        if step == start + 1:  # time steps, not the compilation
          jax.block_until_ready(metrics)
          elapsed = time.perf_counter() - tic
          logging.info("first %sstep (with compilation): %.1fs", name, elapsed)
          tic, timed = time.perf_counter(), 0
        if step % cfg.log_every_steps == 0 or step == run.total_steps:
          check_finite(history, step, last_saved())
          log.train(history, step, run, timed=timed, seconds=time.perf_counter() - tic)
          history, tic, timed = [], time.perf_counter(), 0
        if stop.signal:
          save(state, step, step / run.steps_per_epoch, {"interrupted_by": stop.signal})
          logging.warning("%s: saved step %d; rerun the same command to resume", stop.signal, step)
          raise KeyboardInterrupt(f"stopped by {stop.signal} at step {step} (saved)")
      done = epoch + 1
      evaluation = {}
      if done % cfg.eval_every_epochs == 0 or done == epochs:
        evaluation = probe_accuracy(
          probe_logits, state, test_set, batch_size=cfg.eval_batch_size, mesh=mesh
        )
        log.write("test", {"step": step, "epoch": done, **evaluation})
        logging.info("%sepoch %d test probe top-1 %.4f", name, done, evaluation["probe_top1"])
      if done % checkpoint_every_epochs == 0 or done == epochs:
        save(state, step, done, evaluation)
  return state


def check_finite(history: list[dict], step: int, last_saved: int | None) -> None:
  """The NaN guard: stop at the first non-finite metric rather than save a broken state."""
  bad = sorted(k for k, v in mean_metrics(history).items() if not math.isfinite(v))
  if bad:
    raise FloatingPointError(
      f"non-finite {bad} at step {step}; the last checkpoint is step {last_saved}: lower the "
      "learning rate or check the data, then rerun to resume from it"
    )


def run_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """The `pretrain` stage of `umm_jax.main`."""
  pretrain(config, workdir)
