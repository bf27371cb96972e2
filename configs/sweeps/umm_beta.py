"""The paper's Table 7: β, the weight of the JS term in UMM's inner loss (`umm.beta`), BYOL.

Run (pre-training, UMM and the evaluate stage per point; add --seeds=5 for the mean of five runs
that the paper's Table 1 reports):
  python -m umm_jax.sweep --config=configs/byol_cifar10.py --workdir=runs/table7_beta \
    --sweep=configs/sweeps/umm_beta.py \
    --config.stages='("pretrain", "umm", "evaluate", "report")'
Add --dry_run (and --launcher='launch/slurm.sh --nodes=1 --gpus-per-node=8') for one cluster
command per point. Each point pre-trains its own encoder, the same one for every β of a seed.

Paper (Section 6.6, Table 7): BYOL + UMM, linear top-1 on CIFAR-10, over seven values of β:
91.87, 92.64, 92.99, 92.71, 92.33, 91.84, 90.97. The β of each column were lost with the
equations in our copy of the paper. This grid is our choice: seven values with our default
β = 0.1 (spec section 4) in the third column, where the paper's peak equals its Table 1
BYOL + UMM (92.99 linear / 90.81 5-NN), and β = 0 first: the `**` ablation (no JS term), which
Table 1 reports at 92.36 / 89.54 for BYOL. Expect a peak near β = 0.1 and a fall for large β.
"""


def get_sweep():
  return {"umm.beta": (0.0, 0.01, 0.1, 0.2, 0.5, 1.0, 2.0)}
