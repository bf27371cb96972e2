r"""RELIC v2 on ImageNet-100: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 256, 400 epochs; checkpoints every 5
epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet100"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.5 x batch/256, weight decay 1e-6; 10 warm-up epochs from 3e-5, then cosine to 0.
RELIC v2 has no published recipe at this scale: the optimiser settings are BYOL's (solo-learn's
scripts/pretrain/imagenet-100/byol.yaml; unverified for RELIC v2), the heads its module's defaults.

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.
ImageNet-100 is the 100-class subset of CMC (umm_jax/assets/imagenet100_classes.txt), read from the
prepared ImageNet.

Run:
  python -m umm_jax.main --config=configs/relic_v2_imagenet100.py \
    --workdir=runs/relic_v2_imagenet100 \
    --config.data.data_dir=<dir>

Expect: the UMM paper's Table 2 reports 75.88 top-1 / 93.52 top-5 linear for RELIC v2 on
ImageNet-100 (ResNet-50, mean of five runs; 77.44 / 94.73 after UMM). This config's stages log the
online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint
(monitor.json), the offline k-NN and linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("relic_v2", "imagenet100")
