"""Evaluation on held-out sets: mean@N, pass@k and maj@N (and greedy accuracy) per dataset; and
lm-evaluation-harness tasks before and after training (the alignment tax).

    python -m cfpo_jax.evaluate --config=configs/math_qwen.py:1.5b --config.eval.checkpoint=DIR
    python -m cfpo_jax.evaluate --config=configs/align_llama.py --config.eval.checkpoint=DIR \
        "--config.eval.lm_eval_tasks=('arc_easy', 'hellaswag', 'winogrande')"

For each prompt, N = `eval.num_samples` completions are sampled and scored 0/1 by the dataset's
correctness reward (`gsm8k` for the gsm8k preset, `code` for humaneval and mbpp — the row's
unit tests in the sandbox —, `math` otherwise), which gets the row's other fields too:

* mean@N — the mean score over all N samples of all prompts;
* pass@k — the unbiased estimator 1 − C(N−c, k)/C(N, k) per prompt with c correct of N (Chen
  et al. 2021), averaged; k ≤ N;
* maj@N — the score of the most frequent extracted answer (the last `\\boxed{}` for math, the
  number for gsm8k, the code without whitespace for code; ties: the answer seen first;
  completions without one do not vote);
* greedy — accuracy of one temperature-0 completion, when `eval.greedy`.

Generations with their scores go to `<output_dir>/<dataset>[_step<S>].jsonl`, metrics to
`summary[_step<S>].json`. `evaluate` takes the sampler as a function, so its logic runs without
a model; `evaluate_model` wires the policy and `cfpo_jax.sampling.generate`.

With `eval.lm_eval_tasks`, the tasks run through `cfpo_jax.lm_eval` on `model.path` (before) and
`eval.checkpoint` (after); `<output_dir>/lm_eval.json` holds both and the relative change per
metric, (after − before) / |before|.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from cfpo_jax import data as data_lib
from cfpo_jax import rewards

log = logging.getLogger(__name__)

# prompts (token-id lists), n, greedy, their examples → n completion texts per prompt
SampleFn = Callable[[list[list[int]], int, bool, list[dict]], list[list[str]]]
CORRECTNESS_REWARD = {"gsm8k": "gsm8k", "math": "math", "math500": "math", "humaneval": "code",
                      "mbpp": "code", None: "math"}


def correctness_reward(dataset) -> str:
    """The reward that says right/wrong for `dataset`: by preset, and `gsm8k` (numeric) for the
    synthetic task, whose answers are exact integers written without a box — so its majority
    vote compares the numbers instead of finding no `\\boxed{}` to vote on."""
    if dataset.source.startswith("synthetic:"):
        return "gsm8k"
    return CORRECTNESS_REWARD[dataset.preset]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of n samples: 1 − C(n−c, k)/C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_score(keys: Sequence[str | None], scores: Sequence[float]) -> float:
    """Score of the most frequent non-None key (ties: first seen); 0 when no key."""
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return float(scores[list(keys).index(winner)])


class _Progress:
    """A tqdm bar on a terminal, plain log lines (about every 10%) otherwise."""

    def __init__(self, total: int, name: str, enabled: bool):
        self.total, self.name, self.done, self.enabled = total, name, 0, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"eval {name}", unit="prompt")
        self.next_line = 0
        self.start = time.time()

    def update(self, count: int, mean: float):
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            self.bar.set_postfix(mean=f"{mean:.3f}")
        elif self.enabled and (self.done >= self.next_line or self.done == self.total):
            print(f"eval {self.name}: {self.done}/{self.total} prompts, mean {mean:.3f}, "
                  f"{time.time() - self.start:.0f} s", file=sys.stderr, flush=True)
            self.next_line = self.done + max(self.total // 10, 1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def evaluate(sample_fn: SampleFn, datasets: Sequence[data_lib.Dataset],
             builder: data_lib.PromptBuilder, *, num_samples: int, ks: Sequence[int] = (1,),
             greedy: bool = False, batch_size: int = 32, max_examples: int = 0,
             max_prompt_len: int | None = None,
             num_workers: int = rewards.workers.DEFAULT_NUM_WORKERS,
             timeout_s: float = rewards.workers.DEFAULT_TIMEOUT_S,
             max_memory_gb: float = rewards.workers.DEFAULT_MAX_MEMORY_GB,
             output_dir: str | None = None, step: int | None = None,
             progress: bool = True) -> dict[str, dict[str, float]]:
    """Metrics per dataset name: {"mean@N", "pass@k"..., "maj@N", ["greedy"], "num_examples",
    "skipped_long", "failures"}.

    sample_fn(prompts, n, greedy, examples) → for each prompt its n completion texts (greedy: n = 1
    at temperature 0); `examples` are the prompts' dataset rows (multi-turn environments start
    their episodes from them). max_examples: the first rows of each dataset only (0: all). Prompts longer
    than max_prompt_len tokens are skipped and counted. num_workers, timeout_s, max_memory_gb:
    the reward scorer's (see `cfpo_jax.rewards.Scorer`).
    """
    bad_ks = [k for k in ks if not 1 <= k <= num_samples]
    if bad_ks:
        raise ValueError(f"eval ks {tuple(ks)}: each k must be in 1..num_samples={num_samples}")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    suffix = "" if step is None else f"_step{step}"
    results = {}
    for dataset in datasets:
        reward_name = correctness_reward(dataset)
        vote_key = rewards.VOTE_KEYS[reward_name]
        count = min(len(dataset), max_examples) if max_examples else len(dataset)
        totals = collections.defaultdict(float)
        used = skipped = failures = 0
        writer = open(os.path.join(output_dir, f"{dataset.name}{suffix}.jsonl"), "w") \
            if output_dir else None
        bar = _Progress(count, dataset.name, progress)
        with rewards.Scorer([reward_name], num_workers=num_workers, timeout_s=timeout_s,
                            max_memory_gb=max_memory_gb) as scorer:
            for start in range(0, count, batch_size):
                examples, prompts = [], []
                for index in range(start, min(start + batch_size, count)):
                    example = dataset[index]
                    tokens = builder.build(example["question"])[1]
                    if max_prompt_len is not None and len(tokens) > max_prompt_len:
                        skipped += 1
                        continue
                    examples.append(dict(example, index=index))
                    prompts.append(tokens)
                if not examples:
                    bar.update(min(start + batch_size, count) - start, 0.0)
                    continue
                runs = [("sample", num_samples, False)] + ([("greedy", 1, True)] if greedy else [])
                for kind, n, is_greedy in runs:
                    texts = sample_fn(prompts, n, is_greedy, examples)
                    if len(texts) != len(prompts) or any(len(t) != n for t in texts):
                        raise ValueError(f"sample_fn returned {[len(t) for t in texts]} "
                                         f"completions for {len(prompts)} prompts × {n}")
                    flat = [t for per_prompt in texts for t in per_prompt]
                    answers, fields = data_lib.reward_inputs(examples, n)
                    scores = scorer(flat, answers, **fields)
                    failures += scores.failures[reward_name]
                    score_PxN = scores.per_fn[reward_name].reshape(len(examples), n)
                    for p, example in enumerate(examples):
                        _accumulate(totals, kind, score_PxN[p], texts[p], vote_key, ks)
                        if writer:
                            for j, text in enumerate(texts[p]):
                                writer.write(json.dumps({
                                    "index": example["index"], "kind": kind, "sample": j,
                                    "question": example["question"], "answer": example["answer"],
                                    "completion": text, "extracted": vote_key(text),
                                    "score": float(score_PxN[p, j])}) + "\n")
                used += len(examples)
                bar.update(min(start + batch_size, count) - start,
                           totals["mean"] / max(used, 1))
        bar.close()
        if writer:
            writer.close()
        metrics = {f"mean@{num_samples}": totals["mean"] / max(used, 1)}
        metrics.update({f"pass@{k}": totals[f"pass@{k}"] / max(used, 1) for k in ks})
        metrics[f"maj@{num_samples}"] = totals["maj"] / max(used, 1)
        if greedy:
            metrics["greedy"] = totals["greedy"] / max(used, 1)
        metrics.update(num_examples=used, skipped_long=skipped, failures=failures)
        results[dataset.name] = metrics
    if output_dir:
        with open(os.path.join(output_dir, f"summary{suffix}.json"), "w") as f:
            json.dump({"step": step, "datasets": results}, f, indent=2)
    return results


def _accumulate(totals, kind, scores_N, texts, vote_key, ks):
    if kind == "greedy":
        totals["greedy"] += float(scores_N[0])
        return
    correct = int(np.sum(scores_N >= 0.5))
    totals["mean"] += float(np.mean(scores_N))
    for k in ks:
        totals[f"pass@{k}"] += pass_at_k(len(scores_N), correct, k)
    totals["maj"] += majority_score([vote_key(t) for t in texts], scores_N)


# ---------------------------------------------------------------- the real policy


def make_sample_fn(model, tokenizer, sampling_config, *, seed: int = 0, mesh=None,
                   eos_token_ids: Sequence[int] = (), env=None) -> SampleFn:
    """A `SampleFn` over `cfpo_jax.sampling.generate` with `config.sampling`'s settings; each call
    draws with a fresh seed (seed, seed + 1, ...) so repeated batches are independent. With `env`
    (a `cfpo_jax.envs.EnvRollout`) the completions are multi-turn episodes, tool answers
    included in their text, as in training."""
    from cfpo_jax import sampling
    from cfpo_jax.sharding import to_host

    eos = tuple(eos_token_ids) or (tokenizer.eos_token_id,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    calls = iter(range(seed, sys.maxsize))

    def sample_fn(prompts, n, greedy, examples=None):
        kwargs = dict(max_new_tokens=sampling_config.max_new_tokens,
                      temperature=0.0 if greedy else sampling_config.temperature,
                      top_p=sampling_config.top_p, top_k=sampling_config.top_k,
                      seed=next(calls), n=n, pad_id=pad_id, mesh=mesh,
                      **sampling.engine_settings(sampling_config))
        if env is None:
            samples = sampling.generate(model, prompts, eos_token_ids=eos, **kwargs)
        else:
            samples, _ = env.generate(model, examples, prompts, **kwargs)
        tokens_BxN, lengths_B = to_host((samples.tokens, samples.lengths))
        texts = tokenizer.batch_decode([row[:length] for row, length in zip(tokens_BxN, lengths_B)],
                                       skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    return sample_fn


def eval_datasets(config) -> list[data_lib.Dataset]:
    """`config.eval.sources`, each with the preset its name implies; a synthetic source uses
    config.data.seed + 1, so its problems are not the training ones."""
    return [data_lib.load(source, preset=data_lib.preset_for(source),
                          synthetic=config.data.synthetic, seed=config.data.seed + 1)
            for source in config.eval.sources]


def evaluate_model(model, tokenizer, config, *, output_dir: str, step: int | None = None,
                   mesh=None, eos_token_ids: Sequence[int] = (),
                   progress: bool = True) -> dict[str, float]:
    """`evaluate` of a policy on `config.eval.sources` with config.sampling / eval / rewards
    settings; flat metrics {"<dataset>/<metric>": value} for the trainer's metrics file.

    Every process of a multi-process run calls it (sampling and scoring are collective, so all
    get the same metrics); only process 0 writes the files to `output_dir`."""
    import jax

    output_dir = output_dir if jax.process_index() == 0 else None
    from cfpo_jax import envs

    env = envs.EnvRollout.from_config(config, tokenizer, tuple(eos_token_ids) or (tokenizer.eos_token_id,))
    sample_fn = make_sample_fn(model, tokenizer, config.sampling, seed=config.seed + 1,
                               mesh=mesh, eos_token_ids=eos_token_ids, env=env)
    builder = data_lib.PromptBuilder.from_config(tokenizer, config.data, envs.prompt_tools(config.env))
    results = evaluate(
        sample_fn, eval_datasets(config), builder,
        num_samples=config.eval.num_samples, ks=tuple(config.eval.ks), greedy=config.eval.greedy,
        batch_size=config.data.batch_size, max_examples=config.eval.max_examples,
        max_prompt_len=config.sampling.max_prompt_len, num_workers=config.rewards.num_workers,
        timeout_s=config.rewards.timeout_s, max_memory_gb=config.rewards.max_memory_gb,
        output_dir=output_dir, step=step, progress=progress)
    if env is not None:
        env.close()
    return {f"{name}/{metric}": value for name, metrics in results.items()
            for metric, value in metrics.items()}


# ---------------------------------------------------------------- lm-eval tasks, alignment tax


def lm_eval_tasks(path: str, tasks: Sequence[str], *, limit: int = 0, batch_size: int = 16,
                  include_path: str = "", dtype: str | None = None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness `tasks` on the checkpoint at `path` through our model class
    (`cfpo_jax.lm_eval`): {task: {"metric,filter": value}}, standard errors and lm-eval's
    bookkeeping (`alias`, `sample_len`) left out. Needs the [eval] extra."""
    try:
        import lm_eval as harness
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("eval.lm_eval_tasks needs lm-evaluation-harness: pip install 'cfpo_jax[eval]'") from e
    from cfpo_jax import lm_eval as cfpo_lm_eval

    model = cfpo_lm_eval.CfpoJaxLM(pretrained=path, batch_size=batch_size, dtype=dtype)
    output = harness.simple_evaluate(
        model=model, tasks=list(tasks), limit=limit or None,
        task_manager=TaskManager(include_path=include_path or None))
    # lm-eval names every metric "metric,filter"; the other keys are not scores.
    return {task: {metric: float(value) for metric, value in metrics.items()
                   if "," in metric and "_stderr," not in metric and isinstance(value, (int, float))}
            for task, metrics in output["results"].items()}


def alignment_tax(before: dict[str, dict[str, float]],
                  after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{task: {metric: relative change (after − before) / |before|}} over the metrics both have
    (NaN where before is 0). A drop in accuracy after training is a negative change: the tax."""
    return {task: {metric: (after[task][metric] - value) / abs(value) if value else math.nan
                   for metric, value in metrics.items() if metric in after.get(task, {})}
            for task, metrics in before.items() if task in after}


def alignment_tax_report(config, before_path: str, after_path: str, output_dir: str) -> dict:
    """`config.eval.lm_eval_tasks` before (`before_path`) and after (`after_path`) training, their
    relative change, written to `<output_dir>/lm_eval.json` and returned."""
    kwargs = dict(limit=config.eval.lm_eval_limit, batch_size=config.eval.lm_eval_batch_size,
                  include_path=config.eval.lm_eval_include_path, dtype=config.model.dtype)
    before = lm_eval_tasks(before_path, config.eval.lm_eval_tasks, **kwargs)
    after = lm_eval_tasks(after_path, config.eval.lm_eval_tasks, **kwargs)
    report = {"before": {"path": before_path, "results": before},
              "after": {"path": after_path, "results": after},
              "relative_change": alignment_tax(before, after)}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "lm_eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


# ---------------------------------------------------------------- command line


def main(argv):
    del argv
    from absl import flags

    from cfpo_jax import config as config_lib
    from cfpo_jax import models

    config = flags.FLAGS.config
    config_lib.validate(config)  # everything, before any model is loaded or compiled
    if not config.eval.sources and not config.eval.lm_eval_tasks:
        raise ValueError("config.eval.sources and config.eval.lm_eval_tasks are empty: name the "
                         "data sets or lm-eval tasks to evaluate on")
    path = config.eval.checkpoint or config.model.path
    workdir = flags.FLAGS.workdir or config.workdir
    output_dir = config.eval.output_dir or os.path.join(workdir or ".", "eval")
    if config.eval.lm_eval_tasks:
        if not config.eval.checkpoint:
            raise ValueError("eval.lm_eval_tasks compares model.path (before training) with "
                             "eval.checkpoint (after); set eval.checkpoint")
        report = alignment_tax_report(config, config.model.path, config.eval.checkpoint, output_dir)
        print(f"{'task/metric':<32} {'before':>9} {'after':>9} {'change':>9}")
        for task, changes in report["relative_change"].items():
            for metric, change in changes.items():
                print(f"{task + '/' + metric:<32} {report['before']['results'][task][metric]:>9.4f} "
                      f"{report['after']['results'][task][metric]:>9.4f} {change:>+9.2%}")
        print(f"lm-eval results in {os.path.join(output_dir, 'lm_eval.json')}")
        if not config.eval.sources:
            return
    tokenizer = models.load_tokenizer(path)
    model = models.from_pretrained(path, param_dtype=config.model.param_dtype,
                                   dtype=config.model.dtype, attention=config.model.attention,
                                   unroll_layers=config.model.unroll_layers)
    metrics = evaluate_model(model, tokenizer, config, output_dir=output_dir,
                             eos_token_ids=models.eos_token_ids(path, tokenizer))
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"generations and summary.json in {output_dir}")


def _define_flags():
    """The command's flags, defined where they are parsed (the trainer imports this module)."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "evaluation config: a shipped config by name "
                                    "or a path[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", None, "where eval/ goes (default config.workdir)")
    flags.mark_flags_as_required(["config"])


def _parse_flags(argv):
    """absl flag parsing with the config found by name (`config.find`)."""
    from absl import flags

    from cfpo_jax import config as config_lib

    return flags.FLAGS(config_lib.resolve_flag(argv, "config"))


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)
