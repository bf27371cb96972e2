r"""Barlow Twins on ImageNet-100: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 256, 400 epochs; checkpoints every 5
epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet100"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-4; 10 warm-up epochs from 3e-5, then cosine to 0.
Barlow Twins: proj_hidden_dim=2048, proj_output_dim=2048, scale_loss=0.1 (others: the module's
defaults). Source: solo-learn's scripts/pretrain/imagenet-100/barlow.yaml. solo-learn tuned it for
ResNet-18; this runs the paper's ResNet-50.

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.
ImageNet-100 is the 100-class subset of CMC (umm_jax/assets/imagenet100_classes.txt), read from the
prepared ImageNet.

Run:
  python -m umm_jax.main --config=configs/barlow_twins_imagenet100.py \
    --workdir=runs/barlow_twins_imagenet100 \
    --config.data.data_dir=<dir>

Expect: the UMM paper's Table 2 reports 75.97 top-1 / 92.91 top-5 linear for Barlow Twins on
ImageNet-100 (ResNet-50, mean of five runs; 77.18 / 94.17 after UMM). solo-learn's README results
table reports 80.38 online, 80.16 offline Acc@1 for Barlow Twins with this recipe on ResNet-18 (400
epochs). This config's stages log the online linear probe's test accuracy (metrics.jsonl), the
layer-wise monitor of every checkpoint (monitor.json), the offline k-NN and linear protocols
(evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("barlow_twins", "imagenet100")
