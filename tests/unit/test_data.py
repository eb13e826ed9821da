"""Prompt datasets: sources, presets, prompt building, the resumable iterator."""

import json
import re
import sys

import pytest

from tests.fixtures.shared_data import shared_file
from tests.fixtures.tiny_tokenizer import tiny_tokenizer
from cfpo_jax import data


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"jsonl:{path}"


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed_and_right():
    spec = {"digits": 3, "ops": "+-*", "terms": 4, "size": 500}
    a = data.load("synthetic:arithmetic", synthetic=spec, seed=7)
    b = data.load("synthetic:arithmetic", synthetic=spec, seed=7)
    c = data.load("synthetic:arithmetic", synthetic=spec, seed=8)
    rows = [a[i] for i in range(len(a))]
    assert len(a) == 500 and rows == [b[i] for i in range(500)]
    assert rows != [c[i] for i in range(500)]
    seen_ops = set()
    for row in rows:
        expression = re.fullmatch(r"What is ([\d +*-]+)\?", row["question"]).group(1)
        assert row["expression"] == expression
        tokens = expression.split(" ")
        numbers, ops = tokens[0::2], tokens[1::2]
        assert len(numbers) == 4 and all(0 <= int(n) < 1000 for n in numbers)
        seen_ops |= set(ops)
        # Python's own arithmetic is the reference (our generated text, never model output).
        assert int(row["answer"]) == eval(expression, {"__builtins__": {}}), row
    assert seen_ops == {"+", "-", "*"}


def test_synthetic_config_errors_name_the_valid_values():
    with pytest.raises(ValueError, match="valid operations"):
        data.load("synthetic:arithmetic", synthetic={"ops": "+/"})
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'depth'.*'digits'"):
        data.load("synthetic:arithmetic", synthetic={"depth": 3})
    with pytest.raises(ValueError, match=r"unknown synthetic task 'geometry'.*arithmetic"):
        data.load("synthetic:geometry")


# ---------------------------------------------------------------- sources and presets

def test_source_spec_errors():
    with pytest.raises(ValueError, match=r"'csv:x'.*tfds:<name>\[:split\].*jsonl:<path>"):
        data.load("csv:x")
    with pytest.raises(ValueError, match="No such file.*/no/such.jsonl"):
        data.load("jsonl:/no/such.jsonl")


def test_gsm8k_preset_on_real_data():
    path = shared_file("gsm8k_test.jsonl")
    ds = data.load(f"jsonl:{path}", preset="gsm8k")
    assert len(ds) == 1319 and ds.name == "gsm8k_test"
    raw = json.loads(path.read_text().splitlines()[5])
    row = ds[5]
    assert row["question"] == raw["question"]
    assert row["answer"] == raw["answer"].split("####")[-1].strip().replace(",", "")
    assert row["solution"] == raw["answer"]


def test_math_preset_on_real_data_and_solution_only_rows(tmp_path):
    path = shared_file("math500_test.jsonl")
    ds = data.load(f"jsonl:{path}", preset=data.preset_for(str(path)))
    raw = json.loads(path.read_text().splitlines()[0])
    assert ds.preset == "math"
    assert (ds[0]["question"], ds[0]["answer"], ds[0]["level"]) == (
        raw["problem"], raw["answer"], raw["level"])
    spec = _write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "p", "solution": r"so $\boxed{\frac{1}{2}}$."}])
    assert data.load(spec, preset="math")[0]["answer"] == r"\frac{1}{2}"


def test_missing_field_names_field_row_and_source(tmp_path):
    spec = _write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "q", "answer": "#### 1"}, {"prompt": "q", "answer": "#### 2"}])
    ds = data.load(spec, preset="gsm8k")
    assert ds[0]["answer"] == "1"
    with pytest.raises(ValueError, match=rf"{re.escape(spec)} row 1 has no field 'question'"):
        ds[1]
    with pytest.raises(ValueError, match="unknown data preset 'gsm9k'"):
        data.load(spec, preset="gsm9k")


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyGsm(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"question": text, "answer": text}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"question": f"q{i}", "answer": f"work #### {i},000"}

    TinyGsm(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    ds = data.load("tfds:tiny_gsm:test", preset="gsm8k", tfds_data_dir=str(tmp_path))
    assert len(ds) == 4 and ds.name == "tiny_gsm_test"
    rows = [ds[i] for i in range(4)]  # tfds shuffles rows when it writes them
    assert sorted(r["question"] for r in rows) == ["q0", "q1", "q2", "q3"]
    assert all(r["answer"] == r["question"][1] + "000" for r in rows)
    with pytest.raises(ValueError, match=r"tfds dataset 'tiny_gsm' split 'train' is not prepared"):
        data.load("tfds:tiny_gsm", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="tfds build no_such_set"):
        data.load("tfds:no_such_set:test", tfds_data_dir=str(tmp_path))


def test_hf_source_without_datasets_says_how_to_install(monkeypatch):
    # A None entry makes `import datasets` fail as if the extra were not installed (lm-eval, in
    # the test extra, installs it).
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'cfpo_jax\[hf\]'"):
        data.load("hf:openai/gsm8k:main:test")


def test_hf_source_reads_a_local_dataset_repository(tmp_path, monkeypatch):
    """`hf:<repo>:<split>` through `datasets.load_dataset`, offline, on a local repository
    directory whose data files name their splits."""
    pytest.importorskip("datasets", reason="the hf extra is not installed")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "tiny_gsm"
    repo.mkdir()
    for split, count in (("train", 5), ("test", 3)):
        _write_jsonl(repo / f"{split}.jsonl",
                     [{"question": f"{split} {i}", "answer": f"so #### {i}"} for i in range(count)])
    ds = data.load(f"hf:{repo}:test", preset="gsm8k")
    assert len(ds) == 3
    assert [ds[i] for i in range(3)] == [
        {"question": f"test {i}", "answer": str(i), "solution": f"so #### {i}"} for i in range(3)]
    assert len(data.load(f"hf:{repo}")) == 5  # the default split is train


# ---------------------------------------------------------------- prompts

def test_chat_prompt_uses_the_tokenizer_template():
    tokenizer = tiny_tokenizer()
    builder = data.PromptBuilder(tokenizer, "chat", "please reason step by step",
                                 "{question} put your final answer within \\boxed{}")
    text, ids = builder.build("what is 3 + 4 ?")
    assert text == ("<|system|> please reason step by step <|end|> <|user|> what is 3 + 4 ? put "
                    "your final answer within \\boxed{} <|end|> <|assistant|> ")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|system|>")
    no_system, _ = data.PromptBuilder(tokenizer, "chat").build("what is 3 ?")
    assert no_system == "<|user|> what is 3 ? <|end|> <|assistant|> "


def test_plain_prompt_for_base_models():
    tokenizer = tiny_tokenizer(chat=False)
    text, ids = data.PromptBuilder(tokenizer, "plain", "reason step by step",
                                   "question : {question} answer :").build("what is 3 ?")
    assert text == "reason step by step\n\nquestion : what is 3 ? answer :"
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len(text.split())
    with pytest.raises(ValueError, match="no chat_template; use template 'plain'"):
        data.PromptBuilder(tokenizer, "chat")
    with pytest.raises(ValueError, match=r"unknown prompt template 'raw'.*'chat', 'plain'"):
        data.PromptBuilder(tokenizer, "raw")
    with pytest.raises(ValueError, match="must contain '{question}'"):
        data.PromptBuilder(tokenizer, "plain", user_template="solve it")


# ---------------------------------------------------------------- iterator

def _iterator(size=10, batch_size=3, seed=0, **kwargs):
    ds = data.load("synthetic:arithmetic", synthetic={"size": size}, seed=1)
    return data.PromptIterator(ds, data.PromptBuilder(tiny_tokenizer(), "chat"), batch_size,
                               seed=seed, **kwargs)


def _questions(batch):
    return [e["question"] for e in batch.examples]


def test_iterator_shuffles_each_epoch_once_through():
    it = _iterator(size=12, batch_size=4, seed=3)
    epochs = [sum((_questions(next(it)) for _ in range(3)), []) for _ in range(2)]
    everything = sorted(it.dataset[i]["question"] for i in range(12))
    assert sorted(epochs[0]) == everything == sorted(epochs[1])
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    assert it.state == {"epoch": 2, "position": 0, "seed": 3}
    again = _iterator(size=12, batch_size=4, seed=3)
    assert _questions(next(again)) == epochs[0][:4]


def test_iterator_state_round_trips_across_epoch_boundaries():
    it = _iterator(size=10, batch_size=3, seed=5)
    for _ in range(4):  # 12 examples: into the second epoch
        next(it)
    state = json.loads(json.dumps(it.state))  # what a checkpoint stores
    expected = [next(it) for _ in range(5)]
    resumed = _iterator(size=10, batch_size=3, seed=5)
    resumed.restore(state)
    got = [next(resumed) for _ in range(5)]
    assert [b.examples for b in got] == [b.examples for b in expected]
    assert [b.prompts for b in got] == [b.prompts for b in expected]
    with pytest.raises(ValueError, match="state has seed 5 but this run's data seed is 6"):
        _iterator(seed=6).restore(state)


def test_iterator_skips_long_prompts_and_fails_if_all_are(tmp_path):
    # Ten questions, four of them far longer than the rest (whitespace tokens, chat template).
    questions = [f"what is {i} ?" if i % 3 else "what is " + " + ".join(["1"] * 20) + " ?"
                 for i in range(10)]
    source = _write_jsonl(tmp_path / "mixed.jsonl",
                          [{"question": q, "answer": str(i)} for i, q in enumerate(questions)])
    builder = data.PromptBuilder(tiny_tokenizer(), "chat")
    limit = 15
    short = sorted(q for q in questions if len(builder.build(q)[1]) <= limit)
    assert len(short) == 6  # the test's premise: long prompts exist and so do short ones
    it = data.PromptIterator(data.load(source), builder, batch_size=6, seed=0,
                             max_prompt_len=limit)
    batch = next(it)
    assert sorted(_questions(batch)) == short  # one pass over the data: every short one, once
    assert max(len(p) for p in batch.prompts) <= limit
    assert it.skipped_long == 4
    with pytest.raises(ValueError, match="every prompt .* longer than max_prompt_len=3"):
        next(_iterator(max_prompt_len=3))


def test_batch_reward_inputs_group_by_group():
    batch = data.Batch([{"question": "a", "answer": "1", "level": 2},
                        {"question": "b", "answer": "2", "level": 5, "extra": 0}], [[1], [2]],
                       ["a", "b"])
    answers, fields = batch.reward_inputs(3)
    assert answers == ["1", "1", "1", "2", "2", "2"]
    assert fields == {"level": [2, 2, 2, 5, 5, 5]}


def test_prompt_collection_preset_takes_the_last_user_turn(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"context_messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                  {"role": "user", "content": "Write a haiku."}], "dataset": "x"},
            {"context": "Plain prompt"},
            {"context_messages": [{"role": "system", "content": "sys"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dataset = data.load(f"jsonl:{path}", preset="prompt_collection")
    assert (dataset[0]["question"], dataset[0]["answer"], dataset[0]["dataset"]) == ("Write a haiku.", "", "x")
    assert dataset[1]["question"] == "Plain prompt"
    with pytest.raises(ValueError, match="row 2: context_messages has no user turn"):
        dataset[2]
