r"""W-MSE on ImageNet-100: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 256, 400 epochs; checkpoints every 5
epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet100"]): Adam, lr 2e-3 x batch/256, L2 weight decay 1e-6
on every parameter; 10 warm-up epochs from 0, then cosine to 0. W-MSE: proj_hidden_dim=1024,
proj_output_dim=64, w_size=128 (others: the module's defaults). Source: solo-learn's
scripts/pretrain/imagenet-100/wmse.yaml. solo-learn tuned it for ResNet-18; this runs the paper's
ResNet-50.

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.
ImageNet-100 is the 100-class subset of CMC (umm_jax/assets/imagenet100_classes.txt), read from the
prepared ImageNet.

Run:
  python -m umm_jax.main --config=configs/wmse_imagenet100.py \
    --workdir=runs/wmse_imagenet100 \
    --config.data.data_dir=<dir>

Expect: the UMM paper's Table 2 reports 76.01 top-1 / 93.12 top-5 linear for W-MSE on ImageNet-100
(ResNet-50, mean of five runs; 77.45 / 94.28 after UMM). solo-learn's README results table reports
67.60 online, 69.06 offline Acc@1 for W-MSE with this recipe on ResNet-18 (400 epochs). This
config's stages log the online linear probe's test accuracy (metrics.jsonl), the layer-wise monitor
of every checkpoint (monitor.json), the offline k-NN and linear protocols (evaluation.json) and
report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("wmse", "imagenet100")
