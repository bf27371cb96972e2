"""The paper's Table 12: ε² of the coding rate in UMM's ΔR term (`umm.eps2`), on CIFAR-10.

Run, once per method of the table (SimCLR, BYOL, Barlow Twins + UMM):
  for m in simclr byol barlow_twins; do
    python -m umm_jax.sweep --config=configs/${m}_cifar10.py --workdir=runs/table12_eps/$m \
      --sweep=configs/sweeps/umm_eps.py \
      --config.stages='("pretrain", "umm", "evaluate", "report")'
  done
Each point pre-trains its own encoder, the same one for every ε² of a seed.

The grid is the table's columns, 0.1 to 0.9. The paper calls the swept value ε; we read it as
the `eps` of the reference codes, which is ε² (spec section 2), so that the spec's ε² = 0.5 is the
middle column. Only `umm.eps2` moves: `monitor.eps2` stays at 0.5. ε² sets the scale of ΔR, so
the monitor's ΔR curves compare only at one ε², and the monitor measures the pre-training
checkpoints, which UMM's ε² does not change (the command above leaves the monitor out anyway).

Paper (Appendix B.1, Table 12): linear top-1 on CIFAR-10 over ε = 0.1, ..., 0.9: SimCLR + UMM
92.92-92.94, BYOL + UMM 92.98-93.00, Barlow Twins + UMM 91.54-91.56: "UMM is insensitive to ε".
Expect each method flat across the grid, at its Table 1 + UMM row (92.93, 92.99, 91.55).
"""


def get_sweep():
  return {"umm.eps2": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
