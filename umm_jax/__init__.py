"""umm_jax: self-supervised learning and UMM (the Undoing Memorization Mechanism) in JAX."""

__version__ = "0.1.0"
