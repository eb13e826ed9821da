"""The lm-evaluation-harness model class: our decoder and sampler behind lm-eval's `LM` API.

    pip install -e '.[eval]'
    lm_eval --model cfpo_jax --model_args pretrained=<dir> \
        --tasks arc_easy,hellaswag,winogrande --batch_size 32

The installed package makes lm-eval's own `lm_eval` command know the model "cfpo_jax": lm-eval 0.4
reads no entry points, so a start-up hook (`cfpo_jax_lm_eval.pth`, see `cfpo_jax.lm_eval_plugin`)
adds it to lm-eval's registry, and this module is imported only when a run names it. From a
checkout that is not installed (PYTHONPATH), `python -m cfpo_jax.lm_eval` is the same command line
(every flag of `lm_eval`). In Python, `import cfpo_jax.lm_eval` registers it too, then
`lm_eval.simple_evaluate(model="cfpo_jax", model_args={"pretrained": dir}, ...)`.

model_args: `pretrained` (HF directory or hub id, as `models.from_pretrained`), `dtype`
("float32", "bfloat16"; default or "auto", as for `hf`: the checkpoint's), `max_length` (context window; default the
model's max_position_embeddings), `data`/`fsdp`/`tensor` (mesh sizes over the local devices,
default all devices on fsdp), `seed` (sampling).

Numbers follow lm-eval's `hf` backend so the two give the same results on the same checkpoint:
the same tokenization (`TemplateLM`'s context/continuation split, BOS handling of `tok_encode`),
the same left truncation to `max_length + 1` tokens, the same rolling windows, greedy = every
continuation token is the argmax. Requests are sorted by length and run in batches of
`batch_size` rows padded to power-of-two widths, split over the mesh's batch axes; only the
continuation positions are unembedded. `generate_until` runs `cfpo_jax.sampling.generate`
(greedy unless the task asks to sample), stops at every EOS id of the checkpoint
(`models.eos_token_ids`: the tokenizer's, config.json's and generation_config.json's; `hf` stops
at the generation config's through transformers' `generate` and at the tokenizer's as a stop
string) and cuts each text at its first stop string.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from cfpo_jax import lm_eval_plugin, models, sampling, sharding

MIN_WIDTH = 16
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def _bucket(length: int) -> int:
    return max(MIN_WIDTH, 1 << max(length - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnums=0)
def _continuation_scores(graphdef, state, tokens_BxT, mask_BxT, index_BxC, valid_BxC):
    """(log-likelihood [B], all-greedy [B]) of the tokens at `index + 1` predicted from `index`."""
    model = nnx.merge(graphdef, state)
    hidden_BxTxD = model.hidden(tokens_BxT, mask_BxT=mask_BxT)
    pred_BxCxD = jnp.take_along_axis(hidden_BxTxD, index_BxC[..., None], axis=1)
    logp_BxCxV = jax.nn.log_softmax(model.unembed(pred_BxCxD), axis=-1)
    targets_BxC = jnp.take_along_axis(tokens_BxT, index_BxC + 1, axis=1)
    logp_BxC = jnp.take_along_axis(logp_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = jnp.argmax(logp_BxCxV, axis=-1) == targets_BxC
    return (jnp.sum(jnp.where(valid_BxC, logp_BxC, 0.0), axis=-1),
            jnp.all(greedy_BxC | ~valid_BxC, axis=-1))


class CfpoJaxLM(TemplateLM):
    """lm-eval `LM` over a `cfpo_jax.models.Transformer` (see the module docstring)."""

    def __init__(self, pretrained: str, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 dtype: str | None = None, max_length: int | None = None, data: int = 1,
                 fsdp: int = -1, tensor: int = 1, seed: int = 0, **unused):
        super().__init__()
        # lm-eval passes its own settings (device, max_batch_size) to every model class.
        del unused
        self.mesh = sharding.make_mesh(int(data), int(fsdp), int(tensor))
        dtype = None if dtype == "auto" else dtype
        self.model = models.from_pretrained(pretrained, mesh=self.mesh, param_dtype=dtype, dtype=dtype)
        self.tokenizer = models.load_tokenizer(pretrained)
        self._graphdef, self._state = nnx.split(self.model)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        # "auto" asks the hf backend to probe memory; fixed shapes here make a plain default right.
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        self._shards = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))
        self._batch_sharding = sharding.batch_sharding(self.mesh)
        self._seed = int(seed)
        self._eos_ids = models.eos_token_ids(pretrained, self.tokenizer)
        self._pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                        else self._eos_ids[0])

    # ------------------------------------------------------------------ tokenization (as `hf`)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False  # the text already carries its BOS
        return self.tokenizer.encode(string, **kwargs)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ scoring

    def _put(self, array: np.ndarray):
        return jax.make_array_from_callback(array.shape, self._batch_sharding, lambda index: array[index])

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists → (sum of continuation log-probs, all greedy)."""
        rows = len(pairs) + (-len(pairs) % self._shards)
        sequences, cont_lens = [], []
        for context, continuation in pairs:
            # As `hf`: the last max_length + 1 tokens, the final one only predicted.
            full = (context + continuation)[-(self.max_length + 1):]
            sequences.append(full)
            cont_lens.append(min(len(continuation), len(full) - 1))
        width = _bucket(max(len(s) for s in sequences))
        cont_width = _bucket(max(cont_lens))
        tokens = np.full((rows, width), self._pad_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        index = np.zeros((rows, cont_width), np.int32)
        valid = np.zeros((rows, cont_width), bool)
        for b, (full, cont_len) in enumerate(zip(sequences, cont_lens)):
            tokens[b, :len(full)], mask[b, :len(full)] = full, 1
            # continuation token j sits at len(full) - cont_len + j, predicted from one before
            index[b, :cont_len] = np.arange(len(full) - cont_len - 1, len(full) - 1)
            valid[b, :cont_len] = True
        with sharding.mesh_context(self.mesh):  # attention per the mesh's platform, per shard
            logp_B, greedy_B = sharding.to_host(_continuation_scores(
                self._graphdef, self._state, *(self._put(x) for x in (tokens, mask, index, valid))))
        return [(float(logp_B[b]), bool(greedy_B[b])) for b in range(len(pairs))]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        del kwargs
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        # Longest first, as `hf`: the first batch shows at once whether memory suffices.
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm,
                          desc="cfpo_jax loglikelihood"):
            chunk = order[start:start + self.batch_size]
            for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                results[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for window in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, scores):
            totals[i] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="cfpo_jax generate_until")
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tokenizer.decode(self.eot_token_id)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            temperature = float(gen_kwargs.pop("temperature", 0.0))
            if not gen_kwargs.pop("do_sample", False):
                temperature = 0.0
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max(self.max_length - max_new, 1):]
                           for i in chunk]
                samples = sampling.generate(
                    self.model, prompts, max_new_tokens=max_new, temperature=temperature,
                    top_p=float(gen_kwargs.get("top_p", 1.0)), top_k=int(gen_kwargs.get("top_k", 0)),
                    eos_token_ids=self._eos_ids, seed=self._seed + start, pad_id=self._pad_id,
                    mesh=self.mesh)
                tokens_BxN, lengths_B = sharding.to_host((samples.tokens, samples.lengths))
                texts = self.tokenizer.batch_decode(
                    [row[:n] for row, n in zip(tokens_BxN, lengths_B)], skip_special_tokens=False)
                for i, text in zip(chunk, texts):
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results


# By name ("module:class") rather than with lm-eval's decorator: the installed start-up hook
# registers that same name, which a class object would clash with when this module runs as
# __main__ (`python -m cfpo_jax.lm_eval`; lm-eval then imports it under its own name).
lm_eval_plugin.register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with "cfpo_jax" registered (this module's import registered it)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
