"""cpift_jax: Core Parameter Isolation Fine-Tuning (arXiv 2508.21741) and weight merging in JAX."""

__version__ = "0.1.0"
