"""The `umm` stage: UMM fine-tuning of a pre-trained encoder over a device mesh, resumable.

Mirrors `umm_jax.pretrain`. `build` adds the UMM optimiser (`make_optimizer`: the `umm` block's
optimiser, learning rate, weight decay and schedule on top of `config.optim`) to the pre-training
pieces; `finetune` starts from the newest pre-training checkpoint of `<workdir>/checkpoints`
(a clear error when there is none) and runs `config.umm.epochs` epochs of `umm.make_umm_step` over
the pre-training data, or resumes from `<workdir>/umm/<variant>/checkpoints`. The stage runs each
variant of `config.umm.variants` in turn, each from the same pre-trained encoder.

Variant 'interleaved' (Table 10, "& UMM") needs no pre-trained encoder: it pre-trains from the
initial state for `config.train.epochs` epochs, each step a normal SSL step on every parameter
(`config.optim`'s optimiser and schedule) followed by a UMM step on `θ` (the UMM optimiser), on
the same batch (`umm.make_interleaved_step`).

Written to `<workdir>/umm/<variant>/`: `checkpoints/<step>` (a `train.TrainState`: `online`
holds the whole encoder and heads, so readers of pre-training checkpoints read these too) every
`umm.checkpoint_every_epochs` epochs and at the end, with metadata `pretrain_step` (the
checkpoint UMM started from) and `variant`; `metrics.jsonl` and TensorBoard events, one record
per log interval (`loss` = `L_SSL`, `js`, `delta_r`, `grad_norm`, `cg_residual`, ...) and per
test evaluation of the online probe. Resume, NaN guard and SIGINT/SIGTERM as in pre-training.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from umm_jax import checkpoint, data, optim, parallel, pretrain, train, umm

UMM_DIR = "umm"


class UmmRun(NamedTuple):
  """The pieces of a UMM run.

  Attributes:
    run: the pre-training `Run` with the UMM optimiser, schedule and step count (what the loop
      and `pretrain.MetricsLog` read).
    pretrain_run: the pre-training `Run` as `pretrain.build` makes it.
    settings: the UMM hyper-parameters.
    epochs: epochs of this run.
  """

  run: pretrain.Run
  pretrain_run: pretrain.Run
  settings: umm.Settings
  epochs: int


def make_optimizer(
  config: ml_collections.ConfigDict, family: str, *, steps_per_epoch: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The outer optimiser of `θ`: `config.optim` with the `umm` block's overrides.

  The family is `umm.optimizer`, else `optim.name`, else the method's own (`family`); the peak
  learning rate is `umm.lr`, not scaled by the batch; weight decay, schedule and warm-up come
  from the `umm` block, everything else (momentum, LARS η, Adam's β) from `config.optim`.
  """
  hp = dict(config.optim)
  hp.update(
    name=config.umm.optimizer or config.optim.name,
    base_lr=config.umm.lr,
    scale_lr_by_batch=False,
    weight_decay=config.umm.weight_decay,
    schedule=config.umm.schedule,
    warmup_epochs=config.umm.warmup_epochs,
  )
  return optim.create(
    hp,
    family=family,
    global_batch=config.train.batch_size,
    steps_per_epoch=steps_per_epoch,
    total_steps=total_steps,
  )


def variant_dir(workdir: str | os.PathLike, variant: str) -> epath.Path:
  """Where the `umm` stage writes `variant`'s checkpoints and metrics (a URI keeps its scheme)."""
  return epath.Path(workdir) / UMM_DIR / variant


def encoders(workdir: str | os.PathLike) -> dict[str, epath.Path]:
  """`{name: checkpoint directory}` of the encoders in `workdir`, in the paper's Table 1 order.

  'baseline' is the pre-trained encoder (`checkpoints/`); each UMM variant run by the `umm` stage
  (`umm/<variant>/checkpoints`) is named as in the paper's tables (`umm.VARIANT_LABELS`).
  """
  workdir = epath.Path(workdir)
  found = {"baseline": workdir / pretrain.CHECKPOINT_DIR}
  for variant, label in umm.VARIANT_LABELS.items():
    found[label] = variant_dir(workdir, variant) / pretrain.CHECKPOINT_DIR
  return {name: path for name, path in found.items() if path.is_dir()}


def build(config: ml_collections.ConfigDict, train_set: data.Dataset, variant: str) -> UmmRun:
  """The pieces of a UMM run of `variant` on `train_set` as `config` describes it."""
  base = pretrain.build(config, train_set)
  settings = umm.Settings.from_config(config.umm, variant)
  epochs = config.train.epochs if settings.variant == "interleaved" else config.umm.epochs
  total = base.steps_per_epoch * epochs
  tx, schedule = make_optimizer(
    config, base.method.optimizer, steps_per_epoch=base.steps_per_epoch, total_steps=total
  )
  run = base._replace(tx=tx, schedule=schedule, total_steps=total)
  return UmmRun(run, base, settings, epochs)


def make_step(urun: UmmRun, *, image_size: int, mean, std):
  """The pure step of the run: `umm.make_umm_step`, or the interleaved SSL + UMM step."""
  run, base = urun.run, urun.pretrain_run
  common = dict(model=run.model, heads=run.heads, method=run.method, hp=run.hp)
  common.update(probe_tx=run.probe_tx, num_classes=run.num_classes, image_size=image_size)
  common.update(mean=jnp.asarray(mean), std=jnp.asarray(std))
  step = umm.make_umm_step(**common, settings=urun.settings, tx=run.tx, total_steps=run.total_steps)
  if urun.settings.variant != "interleaved":
    return step
  ssl_step = train.make_train_step(**common, tx=base.tx, total_steps=base.total_steps)
  return umm.make_interleaved_step(ssl_step, step)


def umm_state(urun: UmmRun, pretrained: train.TrainState) -> train.TrainState:
  """The run's state from a pre-training state: the UMM optimiser's state on `θ` at step 0, or,
  for 'interleaved', the state as it is with `opt_state = {'ssl': ..., 'umm': ...}`."""
  state = umm.init_state(pretrained, tx=urun.run.tx, split=urun.settings.split)
  if urun.settings.variant == "interleaved":
    return pretrained.replace(opt_state={"ssl": pretrained.opt_state, "umm": state.opt_state})
  return state


def load_pretrained(workdir: epath.Path, target: train.TrainState) -> tuple[train.TrainState, int]:
  """The newest pre-training checkpoint of `workdir` restored into `target`, and its step.

  Raises:
    FileNotFoundError: when `<workdir>/checkpoints` holds no checkpoint.
  """
  directory = workdir / pretrain.CHECKPOINT_DIR
  step = None
  if directory.is_dir():
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
      step = ckpt.latest_step()
      if step is not None:
        return ckpt.restore(step, target), step
  raise FileNotFoundError(
    f"UMM fine-tunes a pre-trained encoder, but {directory} holds no checkpoint: run the "
    "'pretrain' stage first (config.stages = ('pretrain', 'umm'))"
  )


def finetune(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, variant: str
) -> train.TrainState:
  """Runs (or resumes) `variant` on the encoder pre-trained in `workdir`; returns its state."""
  workdir = epath.Path(workdir)
  out = variant_dir(workdir, variant)
  cfg = config.train
  mesh = parallel.make_mesh()
  parallel.check_global_batch(cfg.batch_size, mesh)
  train_set = data.load(config.data, "train")
  test_set = data.load(config.data, "test")
  urun = build(config, train_set, variant)
  run = urun.run
  mean, std = train_set.channel_stats()

  root = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(root)
  # Not the pre-training key: a UMM step must not redraw the views of the same pre-training step.
  step_key = jax.random.split(step_key)[1]
  initial = parallel.replicate(pretrain.init_state(urun.pretrain_run, init_key), mesh)
  state = parallel.replicate(umm_state(urun, initial), mesh)
  max_to_keep = cfg.max_to_keep or None
  ckpt = checkpoint.Checkpointer(out / pretrain.CHECKPOINT_DIR, max_to_keep=max_to_keep)
  start = ckpt.latest_step() or 0
  source = None
  if start:
    state = ckpt.restore(start, state)
    source = ckpt.metadata(start).get("pretrain_step")
    logging.info("resuming UMM from step %d (%s)", start, ckpt.directory)
  elif urun.settings.variant != "interleaved":
    pretrained, source = load_pretrained(workdir, initial)
    state = parallel.replicate(umm_state(urun, pretrained), mesh)
    logging.info("UMM starts from pre-training step %d", source)
  log = pretrain.MetricsLog(out, resume_step=start)

  step_fn = make_step(urun, image_size=config.data.image_size, mean=mean, std=std)
  step_fn = jax.jit(step_fn, donate_argnums=0, out_shardings=parallel.replicated(mesh))
  probe_logits = pretrain.make_probe_eval(run, mean, std)

  def save(state, step: int, epoch: float, metrics: dict) -> None:
    meta = {"step": step, "epoch": epoch, "variant": urun.settings.variant, **metrics}
    ckpt.save(step, state, metadata={**meta, "pretrain_step": source})

  with ckpt, log:
    return pretrain.train_loop(
      state, step_fn, step_key, config=config, run=run, mesh=mesh, data_sets=(train_set, test_set),
      epochs=urun.epochs, checkpoint_every_epochs=config.umm.checkpoint_every_epochs,
      probe_logits=probe_logits, log=log, start=start, save=save, last_saved=ckpt.latest_step,
      name=f"UMM {variant} ",
    )  # fmt: skip


def run_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """The `umm` stage of `umm_jax.main`: every variant of `config.umm.variants`, in order."""
  for variant in config.umm.variants:
    logging.info("UMM variant %s", variant)
    finetune(config, workdir, variant)
