"""The task's data: tiny_mc.jsonl next to this file (read here, so no path depends on the cwd)."""

import json
import os


def load(**kwargs):
    import datasets

    del kwargs  # lm-eval passes the task's metadata
    with open(os.path.join(os.path.dirname(__file__), "tiny_mc.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
