r"""BYOL on ImageNet: pre-training and the layer-wise monitor.

ResNet-50 with the ImageNet stem on 224-px views; global batch 4096, 1000 epochs; checkpoints every
5 epochs for the monitor.

Recipe (configs/recipes.py, RECIPES["imagenet"]): LARS (eta 1e-3, no lr clipping, biases and norms
excluded), lr 0.2 x batch/256, weight decay 1.5e-6; 10 warm-up epochs from 0, then cosine to 0.
BYOL: proj_hidden_dim=4096, proj_output_dim=256, pred_hidden_dim=4096 (others: the module's
defaults). Source: BYOL's 1000-epoch preset (google-deepmind/deepmind-research
byol/configs/byol.py).

Data: ImageNet-1k through tfds. Register at https://image-net.org/download-images, put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <dir>/downloads/manual, then (TensorFlow is
needed for this step only) `pip install tensorflow && tfds build imagenet2012
--file_format=array_record --data_dir=<dir>`; the run reads it from `--config.data.data_dir`.

Run:
  python -m umm_jax.main --config=configs/byol_imagenet.py \
    --workdir=runs/byol_imagenet \
    --config.data.data_dir=<dir>

Expect: BYOL's README (deepmind-research/byol) expects 74.0-74.5 top-1 (linear) after 1000 epochs
(its released ResNet-50 checkpoint: ~74.4); the UMM paper's Table 3 reports 74.3 top-1 for BYOL at
1000 epochs. This config's stages log the online linear probe's test accuracy (metrics.jsonl), the
layer-wise monitor of every checkpoint (monitor.json), the offline k-NN and linear protocols
(evaluation.json) and report.md.

Notes: BYOL's preset moves the target network's EMA from 0.996 to 1; the byol module fixes 0.99 to 1
(solo-learn's), with no config key to change it yet.
"""

from configs import recipes


def get_config():
  return recipes.config("byol", "imagenet")
