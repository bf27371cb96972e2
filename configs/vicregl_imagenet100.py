r"""VICRegL on ImageNet-100: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 256, 400 epochs; checkpoints every 5
epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet100"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
VICRegL has no published recipe at this scale: the optimiser settings are VICReg's (solo-learn's
scripts/pretrain/imagenet-100/vicreg.yaml; unverified for VICRegL), the heads its module's defaults.

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.
ImageNet-100 is the 100-class subset of CMC (umm_jax/assets/imagenet100_classes.txt), read from the
prepared ImageNet.

Run:
  python -m umm_jax.main --config=configs/vicregl_imagenet100.py \
    --workdir=runs/vicregl_imagenet100 \
    --config.data.data_dir=<dir>

Expect: the UMM paper's Table 2 reports 75.96 top-1 / 92.97 top-5 linear for VICRegL on ImageNet-100
(ResNet-50, mean of five runs; 77.12 / 94.72 after UMM). This config's stages log the online linear
probe's test accuracy (metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json),
the offline k-NN and linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("vicregl", "imagenet100")
