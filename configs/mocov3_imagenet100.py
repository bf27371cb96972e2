r"""MoCo v3 on ImageNet-100: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 256, 400 epochs; checkpoints every 5
epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet100"]): LARS (eta 0.02, lr clipping, biases and norms
excluded), lr 0.3 x batch/256, weight decay 1e-6; 10 warm-up epochs from 3e-5, then cosine to 0.
MoCo v3: proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096, temperature=0.2 (others:
the module's defaults). Source: solo-learn's scripts/pretrain/imagenet-100/mocov3.yaml. solo-learn
tuned it for ResNet-18; this runs the paper's ResNet-50.

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.
ImageNet-100 is the 100-class subset of CMC (umm_jax/assets/imagenet100_classes.txt), read from the
prepared ImageNet.

Run:
  python -m umm_jax.main --config=configs/mocov3_imagenet100.py \
    --workdir=runs/mocov3_imagenet100 \
    --config.data.data_dir=<dir>

Expect: solo-learn's README results table reports 80.36 online, 80.36 offline Acc@1 for MoCo V3 with
this recipe on ResNet-18 (400 epochs), and 85.48 online / 84.58 offline for its ResNet-50 run (whose
recipe is not checked here). This config's stages log the online linear probe's test accuracy
(metrics.jsonl), the layer-wise monitor of every checkpoint (monitor.json), the offline k-NN and
linear protocols (evaluation.json) and report.md.
"""

from configs import recipes


def get_config():
  return recipes.config("mocov3", "imagenet100")
