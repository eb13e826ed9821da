"""Evaluation: pass@k against brute force, metrics and files from a scripted sampler, and the
command line end to end on a tiny checkpoint (when the model and sampler modules are present)."""

import collections
import itertools
import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.tiny_tokenizer import tiny_tokenizer
from cfpo_jax import data, evaluate
from tests.fixtures import paths

REPO_ROOT = paths.ROOT


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluate.pass_at_k(n, 0, n + 1)


def test_majority_score():
    assert evaluate.majority_score(["1", "2", "2", None], [1, 0, 0, 0]) == 0
    assert evaluate.majority_score(["1", "2", None, None], [1, 0, 0, 0]) == 1  # tie: first seen
    assert evaluate.majority_score([None, None], [1, 1]) == 0


def _dataset(tmp_path, rows=10, name="sums.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"question": f"what is {i} + {2 * i} ?",
                                        "answer": str(3 * i)}) + "\n" for i in range(rows)))
    return data.load(f"jsonl:{path}")


class ScriptedSampler:
    """Prompt i (found by its tokens) gets c_i = i mod (n + 1) right answers first, then wrong
    ones (one of them without a box); greedy is right for even i."""

    def __init__(self, dataset, builder):
        self.index = {tuple(builder.build(dataset[i]["question"])[1]): i
                      for i in range(len(dataset))}
        self.calls = []

    def __call__(self, prompts, n, greedy, examples):
        self.calls.append((len(prompts), n, greedy))
        out = []
        for tokens in prompts:
            i = self.index[tuple(tokens)]
            if greedy:
                out.append([f"so \\boxed{{{3 * i + (i % 2)}}}"])
                continue
            c = i % (n + 1)
            wrong = [f"\\boxed{{{3 * i + 1}}}"] * (n - c)
            if wrong:
                wrong[-1] = "no idea"
            out.append([f"it is \\boxed{{{3 * i}}}"] * c + wrong)
        return out


def _expected(rows, n, ks):
    """The metrics written out by hand for ScriptedSampler."""
    mean, passes, maj, greedy = 0.0, {k: 0.0 for k in ks}, 0.0, 0.0
    for i in range(rows):
        c = i % (n + 1)
        mean += c / n
        for k in ks:
            subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
            passes[k] += sum(any(s) for s in subsets) / len(subsets)
        boxed_wrong = max(n - c - 1, 0)  # the unboxed wrong answer does not vote
        maj += float(c > 0 and c >= boxed_wrong)
        greedy += float(i % 2 == 0)
    out = {f"mean@{n}": mean / rows, f"maj@{n}": maj / rows, "greedy": greedy / rows}
    out.update({f"pass@{k}": passes[k] / rows for k in ks})
    return out


def test_evaluate_metrics_and_files(tmp_path, capsys):
    dataset = _dataset(tmp_path, rows=10)
    builder = data.PromptBuilder(tiny_tokenizer(), "chat", "reason step by step")
    sampler = ScriptedSampler(dataset, builder)
    out = tmp_path / "eval"
    results = evaluate.evaluate(sampler, [dataset], builder, num_samples=4, ks=(1, 2, 4),
                                greedy=True, batch_size=3, output_dir=str(out), step=7)
    metrics = results["sums"]
    for key, value in _expected(10, 4, (1, 2, 4)).items():
        assert metrics[key] == pytest.approx(value), key
    assert (metrics["num_examples"], metrics["skipped_long"], metrics["failures"]) == (10, 0, 0)
    assert sampler.calls[:2] == [(3, 4, False), (3, 1, True)]
    lines = [json.loads(line) for line in (out / "sums_step7.jsonl").read_text().splitlines()]
    assert len(lines) == 10 * (4 + 1)
    first = lines[0]
    assert first["index"] == 0 and first["kind"] == "sample" and first["answer"] == "0"
    assert sum(r["score"] for r in lines if r["kind"] == "sample") == sum(i % 5 for i in range(10))
    summary = json.loads((out / "summary_step7.json").read_text())
    assert summary == {"step": 7, "datasets": results}
    assert "eval sums: 10/10 prompts" in capsys.readouterr().err  # plain lines off a terminal


def test_evaluate_gsm8k_preset_limits_and_errors(tmp_path):
    path = tmp_path / "gsm8k_mini.jsonl"
    path.write_text("".join(json.dumps({"question": f"what is {i} ?", "answer": f"so #### {i}"})
                            + "\n" for i in range(6)))
    dataset = data.load(f"jsonl:{path}", preset=data.preset_for(str(path)))
    builder = data.PromptBuilder(tiny_tokenizer(), "chat")

    def sample_fn(prompts, n, greedy, examples):
        return [[f"the answer is {i}", f"#### {i}"][:n] for i in range(len(prompts))]

    results = evaluate.evaluate(sample_fn, [dataset], builder, num_samples=2, ks=(1, 2),
                                max_examples=4, batch_size=4, progress=False)
    # prompt i of the batch of 4 answers i: right for rows 0..3 (flexible extraction included)
    assert results["gsm8k_mini"]["mean@2"] == 1.0
    assert results["gsm8k_mini"]["num_examples"] == 4
    short = evaluate.evaluate(sample_fn, [dataset], builder, num_samples=2, max_prompt_len=2,
                              progress=False)
    assert short["gsm8k_mini"]["skipped_long"] == 6
    with pytest.raises(ValueError, match=r"each k must be in 1..num_samples=2"):
        evaluate.evaluate(sample_fn, [dataset], builder, num_samples=2, ks=(4,))
    with pytest.raises(ValueError, match="returned"):
        evaluate.evaluate(lambda p, n, g, e: [["x"]], [dataset], builder, num_samples=2,
                          progress=False)


def test_synthetic_answers_without_a_box_are_scored_and_voted_numerically():
    dataset = data.load("synthetic:arithmetic", synthetic=dict(digits=1, ops="+", terms=2), seed=3)
    builder = data.PromptBuilder(tiny_tokenizer(), "plain")
    index = {tuple(builder.build(dataset[i]["question"])[1]): dataset[i]["answer"]
             for i in range(4)}

    def sample_fn(prompts, n, greedy, examples):  # two bare right answers and one wrong one per prompt
        answers = [index[tuple(p)] for p in prompts]
        return [[a, f"it is {a}", str(int(a) + 1)][:n] for a in answers]

    results = evaluate.evaluate(sample_fn, [dataset], builder, num_samples=3, ks=(1,),
                                max_examples=4, progress=False)["arithmetic"]
    assert results["mean@3"] == pytest.approx(2 / 3)
    assert results["maj@3"] == 1.0


CONFIG_FILE = '''
from cfpo_jax.config import base_config

def get_config():
    c = base_config()
    c.workdir = {workdir!r}
    c.model.path = {model!r}
    c.data.batch_size = 4
    c.sampling.max_prompt_len = 64
    c.sampling.max_new_tokens = 6
    c.sampling.max_concurrent = 3  # 4 prompts x up to 2 samples through 3 slots
    c.rewards.num_workers = 1
    c.eval.sources = ("synthetic:arithmetic", "jsonl:{gsm8k}")
    c.eval.num_samples = 2
    c.eval.ks = (1, 2)
    c.eval.max_examples = 3
    return c
'''


def test_command_line_validates_the_config_before_loading_a_model(tmp_path):
    config_path = tmp_path / "eval_config.py"
    config_path.write_text(CONFIG_FILE.format(workdir=str(tmp_path / "work"),
                                              model=str(tmp_path / "no_model"),
                                              gsm8k=str(tmp_path / "missing.jsonl")))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.evaluate", f"--config={config_path}",
         "--config.eval.ks=(1,4)", "--config.rewards.fns=('no_such_module:fn',)"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    for problem in ["eval.ks (1, 4): each k must be in 1..eval.num_samples=2",
                    f"no file '{tmp_path}/missing.jsonl'", "cannot import module 'no_such_module'"]:
        assert problem in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "work").exists()


def test_command_line_end_to_end_on_a_tiny_checkpoint(tmp_path):
    import transformers

    from cfpo_jax import models

    tokenizer = tiny_tokenizer()
    hf_config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model_dir = tmp_path / "tiny"
    transformers.Qwen2ForCausalLM(hf_config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    assert models.load_tokenizer(str(model_dir)).chat_template
    gsm8k = tmp_path / "gsm8k_mini.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": f"what is {i} ?", "answer": f"#### {i}"})
                             + "\n" for i in range(5)))
    config_path = tmp_path / "eval_config.py"
    config_path.write_text(CONFIG_FILE.format(workdir=str(tmp_path / "work"), model=str(model_dir),
                                              gsm8k=str(gsm8k)))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.evaluate", f"--config={config_path}",
         "--config.eval.num_samples=3", "--config.eval.ks=(1,3)"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "work" / "eval"
    summary = json.loads((out / "summary.json").read_text())["datasets"]
    assert set(summary) == {"arithmetic", "gsm8k_mini"}
    for name, metrics in summary.items():
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 * (3 + 1)  # 3 prompts × (3 samples + 1 greedy)
        assert metrics["num_examples"] == 3
        # The summary recomputed from the written generations with the formulas written here.
        expected = collections.defaultdict(float)
        for index in sorted({r["index"] for r in rows}):
            samples = [r for r in rows if r["index"] == index and r["kind"] == "sample"]
            [greedy] = [r for r in rows if r["index"] == index and r["kind"] == "greedy"]
            assert [r["sample"] for r in samples] == [0, 1, 2]
            correct = sum(r["score"] == 1.0 for r in samples)
            expected["mean@3"] += correct / 3 / 3
            expected["pass@1"] += correct / 3 / 3
            expected["pass@3"] += float(correct > 0) / 3
            expected["greedy"] += greedy["score"] / 3
            votes = collections.Counter(r["extracted"] for r in samples if r["extracted"])
            if votes:
                top = max(votes.values())
                winner = next(r for r in samples if votes.get(r["extracted"]) == top)
                expected["maj@3"] += winner["score"] / 3
        for key in ("mean@3", "pass@1", "pass@3", "maj@3", "greedy"):
            assert metrics[key] == pytest.approx(expected[key]), (name, key)
            assert f"{name}/{key}: {metrics[key]:.4f}" in result.stdout
