"""launch/colab.ipynb runs top to bottom (nbclient, a real kernel) with a shortened quickstart:
install step skipped (cfpo_jax importable), training, curves from metrics.jsonl, evaluation."""

import json
import os

import pytest

from tests.fixtures import paths

REPO_ROOT = paths.ROOT
NOTEBOOK = os.path.join(REPO_ROOT, "launch", "colab.ipynb")


def test_colab_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the test extra's nbformat is missing")
    nbclient = pytest.importorskip("nbclient", reason="the test extra's nbclient is missing")
    workdir = tmp_path / "colab"
    for name, value in dict(CFPO_COLAB_WORKDIR=str(workdir), CFPO_COLAB_STEPS="2",
                            CFPO_COLAB_WARMSTART_STEPS="2", CFPO_COLAB_EVAL_EXAMPLES="4",
                            PYTHONPATH=REPO_ROOT, MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
                            HF_HUB_OFFLINE="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the notebook's runs use the machine as is
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": REPO_ROOT}}).execute()
    text = "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))
    assert "2 steps; reward" in text
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "reward_mean" in r] == [1, 2]
    assert (workdir / "curves.png").stat().st_size > 10_000
    summary = json.loads((workdir / "eval" / "summary.json").read_text())["datasets"]
    assert summary["arithmetic"]["num_examples"] == 4
    assert set(summary["arithmetic"]) >= {"mean@4", "pass@1", "pass@4", "maj@4", "greedy"}
    assert f"arithmetic {{'mean@4': {round(summary['arithmetic']['mean@4'], 3)}" in text
