"""cfpo_jax: RL post-training of language models in JAX with Clipping-Free Policy Optimization."""

__version__ = "0.1.0"
