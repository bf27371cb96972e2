"""Where UMM splits the encoder (`umm.split`): f_early ends after layer1, layer2 or layer3.

Run (pre-training, UMM and the evaluate stage per point):
  python -m umm_jax.sweep --config=configs/byol_cifar10.py --workdir=runs/umm_split \
    --sweep=configs/sweeps/umm_split.py \
    --config.stages='("pretrain", "umm", "evaluate", "report")'
Each point pre-trains its own encoder, the same one for every split of a seed.

Paper: no table. UMM distils the early layers' generalising features into the last layers
(Section 5), but the paper never names the stage where f_early ends; the default `layer2` is our
choice (spec section 1). This sweep is our ablation of that choice in the setting of Tables 6
and 7 (BYOL, CIFAR-10), against the paper's BYOL + UMM of Table 1 (92.99 linear / 90.81 5-NN
top-1). f_late grows from layer4 alone (`layer3`) to layers 2-4 (`layer1`), and with it the cost
of the log-volume term and of the hyper-gradient.
"""


def get_sweep():
  return {"umm.split": ("layer1", "layer2", "layer3")}
