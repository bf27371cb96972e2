r"""SimCLR on ImageNet: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 4096, 1000 epochs; checkpoints every
5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet"]): LARS (eta 1e-3, no lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-6; 10 warm-up epochs from 0, then cosine to 0.
SimCLR: proj_hidden_dim=2048, proj_output_dim=128, temperature=0.1 (others: the module's defaults).
Source: SimCLR v1's README pre-training command and lars_optimizer.py (google-research/simclr).

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.

Run:
  python -m umm_jax.main --config=configs/simclr_imagenet.py \
    --workdir=runs/simclr_imagenet \
    --config.data.data_dir=<dir>

Expect: SimCLR v1's README lists 69.1 top-1 (linear) for its released ResNet-50 (1x) checkpoint; the
UMM paper's Table 3 reports 70.4 top-1 for SimCLR after 1000 epochs. This config's stages log the
online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint
(monitor.json), the offline k-NN and linear protocols (evaluation.json) and report.md.

Notes: SimCLR's LARS divides by the norm of the decayed gradient and this one by grad norm + wd x
weight norm (solo-learn's); at weight decay 1e-6 the two agree closely.
"""

from configs import recipes


def get_config():
  return recipes.config("simclr", "imagenet")
