"""A learned reward model as a reward function: `config.rewards.fns = ("rm:<path or hub id>", ...)`.

The checkpoint is a Hugging Face `*ForSequenceClassification` (Llama, Qwen2, Qwen3) loaded by
`cfpo_jax.models.from_pretrained` — the policy's loader, sharding table and dtype options — and
scored on device: each (conversation, completion) pair is written with the reward model's *own*
chat template (it may differ from the policy's), tokenized with its own tokenizer, and the batch
goes through one jitted `Transformer.reward` per (rows, width) bucket, its rows split over the
mesh's ('data', 'fsdp') axes. The reward is the score head's first label at the last token.

Decisions written down here:
  * Widths are powers of two (at least 16) up to `max_len`, rows a fixed `batch_size` padded to
    a multiple of the batch shards, so a run compiles a handful of programs, not one per batch.
  * A text longer than `max_len` tokens keeps its *last* `max_len` tokens: the score is read at
    the end, and the completion (the part being judged) is at the end. Such texts are counted in
    `truncated` and the first is logged; make `max_len` cover prompt + completion + template.
  * A non-finite score is a failure like a reward function's (0 for that item, counted): the run
    goes on. Nothing here depends on model output for time or memory — shapes are bounded — so
    unlike host reward functions it needs no deadline.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from cfpo_jax import models
from cfpo_jax.sharding import BATCH_AXES, batch_sharding, mesh_context, to_host

log = logging.getLogger(__name__)

MIN_WIDTH = 16


def _width(longest: int, max_len: int) -> int:
    return min(max(MIN_WIDTH, 1 << max(longest - 1, 0).bit_length()), max_len)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens_BxT, mask_BxT):
    """The reward model's jitted forward: float32 [B], the score of each right-padded row."""
    return nnx.merge(graphdef, state).reward(tokens_BxT, mask_BxT)


class RewardModel:
    """Scores (conversation, completion) pairs with a sequence-classification checkpoint.

    path: HF directory or hub id (with its tokenizer and chat template); mesh: shard parameters
    and batches over it (None: the default device); param_dtype / dtype: as
    `models.from_pretrained` (None: the checkpoint's); max_len: token budget per text;
    batch_size: rows per forward pass (0: the whole call in one pass).
    """

    def __init__(self, path: str, *, mesh=None, param_dtype: str | None = None,
                 dtype: str | None = None, max_len: int = 2048, batch_size: int = 0):
        if max_len < MIN_WIDTH or batch_size < 0:
            raise ValueError(f"reward model {path!r}: need max_len >= {MIN_WIDTH} and batch_size >= 0; "
                             f"got max_len={max_len}, batch_size={batch_size}")
        self.path, self.max_len, self.batch_size = path, int(max_len), int(batch_size)
        self.tokenizer = models.load_tokenizer(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"reward model {path!r}: its tokenizer has no chat template, so prompt "
                             "and completion cannot be written the way it was trained to read them")
        self.model = models.from_pretrained(path, mesh=mesh, param_dtype=param_dtype, dtype=dtype)
        if not self.model.config.num_labels:
            raise ValueError(f"reward model {path!r} is a causal LM (config.json architectures "
                             "*ForCausalLM); a reward model is a *ForSequenceClassification checkpoint")
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.model.config.pad_token_id or 0)
        self._shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
        self._batch_sharding = None if mesh is None else batch_sharding(mesh)
        self.mesh = mesh
        self._graphdef, self._state = nnx.split(self.model)
        self.truncated = 0

    def texts(self, conversations: Sequence[Sequence[dict]], completions: Sequence[str]) -> list[str]:
        """Each conversation (chat messages) followed by its completion as the assistant's turn, in
        the reward model's chat template."""
        return [self.tokenizer.apply_chat_template(
                    [*messages, {"role": "assistant", "content": completion}], tokenize=False)
                for messages, completion in zip(conversations, completions)]

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        # The template writes its own special tokens (BOS included where the model has one).
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for i, row in enumerate(ids):
            if len(row) > self.max_len:
                if self.truncated == 0:
                    log.warning("reward model %s: text %d has %d tokens > rewards.rm_max_len=%d; "
                                "scoring its last %d (later ones are only counted)",
                                self.path, i, len(row), self.max_len, self.max_len)
                self.truncated += 1
                row = row[-self.max_len:]
            out.append(list(row))
        return out

    def __call__(self, conversations: Sequence[Sequence[dict]], completions: Sequence[str]) -> np.ndarray:
        """Rewards float32 [B] for B pairs (non-finite scores are returned as they are)."""
        if len(conversations) != len(completions):
            raise ValueError(f"{len(conversations)} conversations for {len(completions)} completions")
        ids = self._token_ids(self.texts(conversations, completions))
        if not ids:
            return np.zeros((0,), np.float32)
        rows = self.batch_size or len(ids)
        rows += -rows % self._shards
        width = _width(max(len(row) for row in ids), self.max_len)
        scores = []
        for start in range(0, len(ids), rows):
            chunk = ids[start:start + rows]
            tokens = np.full((rows, width), self.pad_id, np.int32)
            mask = np.zeros((rows, width), np.int32)
            for b, row in enumerate(chunk):  # right padding; filler rows stay all-padding
                tokens[b, :len(row)], mask[b, :len(row)] = row, 1
            if self._batch_sharding is not None:  # every host holds the whole batch
                tokens, mask = (jax.make_array_from_callback(x.shape, self._batch_sharding,
                                                             lambda index, x=x: x[index])
                                for x in (tokens, mask))
            with mesh_context(self.mesh):  # attention per the mesh's platform, per shard
                scores.append(to_host(forward(self._graphdef, self._state, tokens, mask))[:len(chunk)])
        return np.concatenate(scores).astype(np.float32)
