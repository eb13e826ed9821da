"""A tiny random-init policy with a character-level tokenizer, written as a Hugging Face directory.

The quickstart and the trainer's tests need a model that exists offline and trains in seconds on
a CPU. Writing it with `save_pretrained` (weights) and `PreTrainedTokenizerFast.save_pretrained`
(tokenizer) means the run then loads it through the same `from_pretrained` / `load_tokenizer`
path as a real checkpoint.

The tokenizer has one token per printable ASCII character plus `<pad>` (id 0), `<eos>` and
`<unk>`; its chat template concatenates the message contents, so `data.template="chat"` and
`"plain"` both work with short arithmetic prompts.
"""

from __future__ import annotations

import os
import shutil
import string

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_tokenizer():
    """A transformers fast tokenizer: one token per character, `<eos>` as EOS, `<pad>` id 0."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(path: str, *, hidden_size: int, intermediate_size: int, num_layers: int,
          num_heads: int, num_kv_heads: int, seed: int = 0) -> str:
    """Writes a random-init Qwen2-style decoder and the tokenizer to `path` (once); returns it."""
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
    model = Transformer(config, rngs=nnx.Rngs(seed))
    # Written to a temporary name and renamed, so a run killed here never leaves half a model.
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    os.replace(tmp, path)
    return path
