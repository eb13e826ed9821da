"""Decoder-only policy models (Qwen2/2.5, Qwen3, Qwen3-MoE, Llama 3 / SmolLM2) in Flax NNX, and reward models
(the same decoder with a score head, from `*ForSequenceClassification` checkpoints), with Hugging
Face checkpoint import/export and the chunked log-probabilities the trainer scores with."""

from cfpo_jax.models.config import ModelConfig
from cfpo_jax.models.hf import eos_token_ids, from_pretrained, load_tokenizer, save_pretrained
from cfpo_jax.models.logprobs import packed_logprobs, sequence_logprobs
from cfpo_jax.models.transformer import Transformer, default_positions

__all__ = [
    "ModelConfig",
    "Transformer",
    "default_positions",
    "eos_token_ids",
    "from_pretrained",
    "load_tokenizer",
    "packed_logprobs",
    "save_pretrained",
    "sequence_logprobs",
]
