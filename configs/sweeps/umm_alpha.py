"""The paper's Table 6: α, the weight of ΔR in UMM's outer loss (`umm.alpha`), BYOL on CIFAR-10.

Run (pre-training, UMM and the evaluate stage per point; add --seeds=5 for the mean of five runs
that the paper's Table 1 reports):
  python -m umm_jax.sweep --config=configs/byol_cifar10.py --workdir=runs/table6_alpha \
    --sweep=configs/sweeps/umm_alpha.py \
    --config.stages='("pretrain", "umm", "evaluate", "report")'
Add --dry_run (and --launcher='launch/slurm.sh --nodes=1 --gpus-per-node=8') for one cluster
command per point. Each point pre-trains its own encoder, the same one for every α of a seed (a
run is a function of its seed).

Paper (Section 6.6, Table 6): BYOL + UMM, linear top-1 on CIFAR-10, over seven values of α:
91.98, 92.59, 92.77, 92.99, 92.56, 91.92, 91.02 — "a properly weighted ΔR can promote the
improvement of UMM". The α of each column were lost with the equations in our copy of the paper.
This grid is our choice: seven values with our default α = 1 (spec section 4) in the fourth
column, where the paper's peak equals its Table 1 BYOL + UMM (92.99 linear / 90.81 5-NN), and
α = 0 first: the `*` ablation (no ΔR term), which Table 1 reports at 92.06 / 90.02 for BYOL.
Expect accuracy to rise to a peak near α = 1 and fall for large α.
"""


def get_sweep():
  return {"umm.alpha": (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)}
