"""The paper's Figure 7: the pre-training learning-rate schedule (`optim.schedule`) and overfitting.

Run, per method and data set of the figure (SimCLR, BYOL, VICRegL on CIFAR-10 and ImageNet-100):
  for c in simclr_cifar10 byol_cifar10 vicregl_cifar10 \
           simclr_imagenet100 byol_imagenet100 vicregl_imagenet100; do
    python -m umm_jax.sweep --config=configs/$c.py --workdir=runs/figure7_lr/$c \
      --sweep=configs/sweeps/lr_schedule.py --config.monitor.layers='("layer4",)'
  done
The monitor's last-layer test accuracy per checkpoint (`monitor.json`, plotted in `report.md`) is
the figure's curve; `--config.optim.warmup_epochs=20` matches the paper's 20 warm-up epochs (our
recipes keep solo-learn's 10).

The schedules (umm_jax.optim.make_schedule) as the paper describes them (Section 6.6): the
warm-up + cosine annealing of its Figures 1-2; `constant`, no schedule; `cosine`, cosine annealing
alone with the same initial and minimum learning rates (`optim.min_lr`); `exponential`, the
multiplicative factor γ = (η_T / η_0)^(1/T) with T the number of training iterations, which is
`optim.exponential` with `optim.exponential_per_epoch=False` (the default): lr(t) = η_0·γ^t per
step, η_T = `optim.final_lr` (1e-6 here; the paper's value was lost with its equations).

Paper: "when learning without a learning rate scheduler, the test accuracies are lower than all
other compared methods ... the warm-up + CosineAnnealing method we adopted exhibits higher test
accuracies than other LR schedulers"; under every schedule the test accuracy first increases, then
decreases after its maximum, and finally stabilises: the overfitting does not depend on the
schedule. Expect the same order (warmup_cosine first, constant last) and a peak before the end.
"""


def get_sweep():
  return {"optim.schedule": ("warmup_cosine", "constant", "cosine", "exponential")}
