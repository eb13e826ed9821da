"""The quickstart's tiny model directory: its tokenizer loads back through `models.load_tokenizer`
(AutoTokenizer) exactly as `tiny.build` wrote it."""

import json

from cfpo_jax import models, tiny

TEXTS = ["What is 3 + 4?", "  two  spaces, a tab-free\nnewline and #### 7<eos>", "x = (a+b)/2;"]


def test_saved_tokenizer_round_trips_through_load_tokenizer(tmp_path):
    path = tiny.build(str(tmp_path / "model"), hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1)
    with open(tmp_path / "model" / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen2"  # the type that made AutoTokenizer drop spaces
    loaded = models.load_tokenizer(path)
    built = tiny.build_tokenizer()
    # One id per character: its index after the special tokens, written out here independently.
    index = {c: i for i, c in enumerate(tiny.SPECIAL_TOKENS + tiny.CHARACTERS)}
    for text in TEXTS:
        plain = text.replace("<eos>", "")
        expected = [index[c] for c in plain] + ([index["<eos>"]] if "<eos>" in text else [])
        assert loaded(text)["input_ids"] == expected, text
        assert built(text)["input_ids"] == expected, text
        assert loaded.decode(expected, skip_special_tokens=True) == plain
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, index["<eos>"])
    assert len(loaded) == len(index)
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == "What is 3 + 4?"
