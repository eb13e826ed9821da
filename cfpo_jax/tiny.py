"""A tiny random-init policy with a character-level tokenizer, written as a Hugging Face directory.

The quickstart and the trainer's tests need a model that exists offline and trains in seconds on
a CPU. Writing it with `save_pretrained` (weights) and `PreTrainedTokenizerFast.save_pretrained`
(tokenizer) means the run then loads it through the same `from_pretrained` / `load_tokenizer`
path as a real checkpoint.

The tokenizer has one token per printable ASCII character plus `<pad>` (id 0), `<eos>` and
`<unk>`; its chat template concatenates the message contents, so `data.template="chat"` and
`"plain"` both work with short arithmetic prompts. It is a transformers `Qwen2Tokenizer` (byte-level
BPE) whose vocabulary is those characters in byte-level spelling (" " is "Ġ") and which has no
merges: `AutoTokenizer` rebuilds a `model_type: qwen2` directory's tokenizer as a Qwen2Tokenizer
with Qwen2's own pre-tokenizer whatever tokenizer.json says, so only a tokenizer that already is
one loads back identically (a plain character-level tokenizer lost every space that way).
Characters outside the vocabulary are dropped, as Qwen2's BPE does.
"""

from __future__ import annotations

import os
import shutil
import string

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_tokenizer():
    """A transformers Qwen2Tokenizer: one token per character, `<eos>` as EOS, `<pad>` id 0."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    byte_level = bytes_to_unicode()
    characters = tuple(byte_level[ord(c)] for c in CHARACTERS)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + characters)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<pad>", eos_token="<eos>",
                               unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(path: str, *, hidden_size: int, intermediate_size: int, num_layers: int,
          num_heads: int, num_kv_heads: int, seed: int = 0, num_experts: int = 0,
          num_experts_per_tok: int = 2, moe_intermediate_size: int = 64) -> str:
    """Writes a random-init Qwen2-style decoder and the tokenizer to `path` (once); returns it.
    With `num_experts` > 0 it is a Qwen3-MoE instead (q/k norm, no q/k/v bias, untied embeddings:
    what transformers' Qwen3MoeForCausalLM reads), `num_experts_per_tok` experts of width
    `moe_intermediate_size` per token, weights renormalised over them."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from flax import nnx

    from cfpo_jax.models import ModelConfig, Transformer, save_pretrained

    tokenizer = build_tokenizer()
    config = ModelConfig(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        rope_theta=10000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        qk_norm=False,
        tie_embeddings=True,
        max_position_embeddings=512,
        param_dtype="float32",
        dtype="float32",
        remat=False,
    )
    if num_experts:
        config = config.replace(model_type="qwen3_moe", qkv_bias=False, qk_norm=True, tie_embeddings=False,
                                num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                                moe_intermediate_size=moe_intermediate_size, norm_topk_prob=True)
    model = Transformer(config, rngs=nnx.Rngs(seed))
    # Written to a temporary name and renamed, so a run killed here never leaves half a model.
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    os.replace(tmp, path)
    return path
