"""The config schema: every key the project reads, with its default.

Experiment configs (`configs/<method>_<dataset>.py`) start from `get_config()` here and
override values; `umm_jax.main` locks the result, so a mistyped `--config.x=...` fails.
"""

import ml_collections

from umm_jax import methods, optim


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random key: the run is a deterministic function of it
  # Stages run in order by `python -m umm_jax.main` (valid names: umm_jax.main.STAGES).
  c.stages = ("pretrain", "monitor", "evaluate", "report")

  # Data: source name (umm_jax.data.SOURCES), model input size, IDX directory for the full set.
  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist_embedded"
  c.data.image_size = 32
  c.data.data_dir = ""  # tfds data_dir / IDX or image-folder root ("" = tfds default)
  c.data.decode_size = 0  # side images are decoded to on the host for lazy sources (0: image_size)
  c.data.workers = 16  # host threads decoding images of lazy sources
  # Long-tail subset of the train split (Cao et al. 2019): 0 = off, else the imbalance ratio.
  c.data.long_tail_ratio = 0.0
  c.data.long_tail_seed = 0
  # Synthetic source: class-structured random images (tests, quick runs).
  c.data.synthetic = ml_collections.ConfigDict(
    dict(num_examples=256, image_size=32, channels=3, num_classes=10, seed=0)
  )

  # Backbone: umm_jax.models.resnet names, stem 'cifar' or 'imagenet', base width, compute dtype.
  c.model = ml_collections.ConfigDict(
    dict(name="resnet18", stem="cifar", width=64, dtype="float32")
  )

  # SSL method: `name` picks one; one block of hyper-parameters per registered method, with
  # the defaults its module declares (e.g. --config.method.simclr.temperature=0.2).
  c.method = ml_collections.ConfigDict()
  c.method.name = "simclr"
  for name, method in methods.REGISTRY.items():
    c.method[name] = ml_collections.ConfigDict(dict(method.defaults))

  # Pre-training loop (umm_jax.pretrain): global batch over all devices and processes; logs every
  # `log_every_steps`; test accuracy of the online linear probe and checkpoints every N epochs.
  c.train = ml_collections.ConfigDict(
    dict(
      epochs=100,
      batch_size=256,
      split="train",  # the split pre-training reads (STL-10: "train+unlabelled")
      log_every_steps=50,
      eval_every_epochs=1,
      eval_batch_size=512,
      checkpoint_every_epochs=5,  # the monitor reads every checkpoint (the paper: every 5)
      max_to_keep=0,  # 0 keeps every checkpoint
      probe_lr=0.1,  # online linear probe: SGD momentum 0.9 on the stop-gradient embedding
    )
  )
  # Optimiser and learning-rate schedule (umm_jax.optim.DEFAULTS documents each key).
  c.optim = ml_collections.ConfigDict(dict(optim.DEFAULTS))

  # Layer-wise monitor (umm_jax.monitor), for every checkpoint and every layer: kNN and linear-probe
  # test accuracy of the pooled features, and label-free ΔR (umm_jax.crr) of the pooled features
  # of two augmented views of `num_images` training images, in chunks of `chunk_size` views.
  c.monitor = ml_collections.ConfigDict(
    dict(
      layers=("layer1", "layer2", "layer3", "layer4"),
      signals=("knn", "linear", "rate_reduction"),  # which of umm_jax.monitor.SIGNALS to measure
      knn_k=5,  # neighbours of the kNN classifier (the paper: 5)
      knn_temperature=0.0,  # 0: majority vote (the paper); T > 0: votes weighted by exp(s / T)
      linear_epochs=100,  # linear-probe epochs (the paper: 500; fewer keep CPU demos short)
      linear_batch_size=256,  # linear-probe batch (the paper: 256)
      linear_lr_start=1e-2,  # linear-probe lr, decayed exponentially per epoch ...
      linear_lr_end=1e-6,  # ... to this value (the paper: 1e-2 to 1e-6)
      eval_train_images=0,  # labelled train images for kNN / linear (0: all; else a seeded subset)
      eval_test_images=0,  # test images for kNN / linear (0: all; else a seeded subset)
      num_images=1024,  # training images whose two views give ΔR
      chunk_size=512,  # views per ΔR chunk (m)
      eps2=0.5,  # ε² of the coding rate
      membership="soft",  # umm_jax.crr membership kind for label-free ΔR
      temperature=0.1,  # τ of the soft membership
      batch_size=256,  # images per forward pass when extracting features
    )
  )

  # Evaluation stage (umm_jax.evaluate): the last checkpoint of pre-training and of UMM, probed on
  # pooled features of each layer with the named protocols (umm_jax.evaluate.PROTOCOLS).
  c.evaluate = ml_collections.ConfigDict(
    dict(
      layers=("embedding",),  # umm_jax.evaluate.FEATURE_LAYERS; the paper reports the last layer
      # Also "semi_1pct" / "semi_10pct": fine-tuning on 1% / 10% of the labels (umm_jax.finetune).
      protocols=("knn_k5", "knn_k200_t0.1", "linear"),
      linear_epochs=500,  # the paper's 500; fewer keep CPU demos short (recorded per result)
      semi_epochs=50,  # semi-supervised fine-tuning epochs (the paper: 50)
      batch_size=512,  # images per forward pass when extracting features
    )
  )

  # UMM (umm_jax.umm, the `umm` stage): the encoder is split after `split`; f_early is frozen and
  # θ = f_late + heads is tuned on the pre-training data by the bi-level step of spec section 4:
  # L_in = L_SSL + β·JS(P_e ‖ P_l), L_out = L_SSL − α·ΔR(Z_l), hyper-gradient of L_out(θ*(θ)).
  c.umm = ml_collections.ConfigDict(
    dict(
      split="layer2",  # last stage of f_early: 'stem', 'layer1', 'layer2' or 'layer3'
      # Variants run in order, each into <workdir>/umm/<variant>/: 'umm'; 'no_rate' (α = 0, the
      # paper's *); 'no_js' (β = 0, **); 'joint' (one gradient of L_SSL + β·JS − α·ΔR, Table 10
      # "+ +"); 'interleaved' (from scratch over train.epochs, each step an SSL step on all
      # parameters then a UMM step on θ, Table 10 "& UMM"). Table 1: ("no_rate", "no_js", "umm").
      variants=("umm",),
      alpha=1.0,  # α, weight of ΔR in the outer loss
      beta=0.1,  # β, weight of the JS term in the inner loss
      epochs=200,  # UMM epochs over the pre-training set ('interleaved' uses train.epochs)
      hypergrad="implicit",  # 'implicit', 'unrolled' or 'finite_difference' (umm_jax.implicit)
      inner_steps=1,  # K: fixed-point iterations ('implicit') or inner gradient steps (others)
      inner_lr=0.01,  # η, the inner (proximal) step size
      cg_maxiter=10,  # 'implicit': cap on conjugate-gradient iterations of the backward solve
      cg_ridge=1e-4,  # 'implicit': ridge added to I + η·H (the Hessian may be indefinite)
      cg_tol=1e-5,  # 'implicit': relative residual at which conjugate gradients stops
      # The curvature in the hyper-gradient: 'full' (Hessian of L_in, the paper's) or 'ssl' (of
      # L_SSL alone: the JS term left out, Gauss–Newton style; far cheaper, see umm_jax.umm).
      hessian="full",
      fd_radius=0.01,  # 'finite_difference': r = fd_radius/‖v‖ (the authors'; see umm_jax.implicit)
      keep_inner_step=False,  # True: apply the outer update to θ* (authors' code), not to θ
      volume="sketch",  # log-volume estimator of the JS term: 'exact', 'sketch', 'grad_norm'
      num_directions=16,  # k, random output directions of the 'sketch' estimator
      volume_ridge=1e-6,  # × the Gram's mean eigenvalue, added to its diagonal (relative)
      # True: v / (the number of log singular values it sums, k for 'sketch'), so that JS's scale,
      # and so what β means, does not grow with k (the spec's v is the plain sum: False).
      volume_normalize=False,
      volume_chunk=0,  # views per batched log-volume factorisation (memory); 0: all
      membership="soft",  # ΔR groups: 'soft' (every view anchors one, τ below) or 'instance'
      temperature=0.1,  # τ of the soft membership
      eps2=0.5,  # ε² of the coding rate
      group_block=0,  # ΔR groups factorised at a time; 0: crr.DEFAULT_GROUP_BLOCK
      # The outer optimiser: optim.create with config.optim overridden by these keys.
      optimizer="",  # umm_jax.optim.OPTIMIZERS; "": optim.name, else the method's own family
      lr=0.01,  # peak learning rate of θ (absolute: not scaled by the batch size)
      weight_decay=0.0,  # fine-tuning starts from trained weights: no decay unless asked
      schedule="cosine",  # umm_jax.optim.SCHEDULES, over the UMM run
      warmup_epochs=0.0,  # 'warmup_cosine' only
      checkpoint_every_epochs=10,  # <workdir>/umm/<variant>/checkpoints cadence (and at the end)
    )
  )
  return c
