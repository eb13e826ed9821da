"""The lm-evaluation-harness model class against lm-eval's own `hf` backend on the same checkpoint."""

import glob
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import venv
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra (also in [test])")

from tests.fixtures import hf_fixtures  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from cfpo_jax import lm_eval as cfpo_lm_eval  # noqa: E402  (registers "cfpo_jax")
from tests.fixtures import paths

REPO = paths.ROOT
TASK_DIR = os.path.join(paths.TESTS, "fixtures", "lm_eval_tasks")
MAX_LENGTH = 64  # small, so that rolling windows and left truncation are exercised
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return hf_fixtures.build_checkpoint("llama", tmp_path_factory.mktemp("lm-eval"), seed=1)


@pytest.fixture(scope="module")
def models(checkpoint):
    from lm_eval.models.huggingface import HFLM

    ours = cfpo_lm_eval.CfpoJaxLM(pretrained=checkpoint, batch_size=4, max_length=MAX_LENGTH)
    ref = HFLM(pretrained=checkpoint, dtype="float32", device="cpu", batch_size=4,
               max_length=MAX_LENGTH)
    return ours, ref


def evaluate(model, limit=None):
    return lm_eval.simple_evaluate(model=model, tasks=["cfpo_tiny_mc"], limit=limit,
                                   task_manager=TaskManager(include_path=TASK_DIR), log_samples=True)


def test_multiple_choice_task_matches_the_hf_backend(models):
    ours, ref = models
    assert len(ours._batch_sharding.device_set) == 8  # the batch is split over the fake devices
    ours_out, ref_out = evaluate(ours), evaluate(ref)
    ours_ll = [[float(r[0]) for r in s["filtered_resps"]] for s in ours_out["samples"]["cfpo_tiny_mc"]]
    ref_ll = [[float(r[0]) for r in s["filtered_resps"]] for s in ref_out["samples"]["cfpo_tiny_mc"]]
    assert len(ours_ll) == 16 and [len(c) for c in ours_ll] == [len(c) for c in ref_ll]
    np.testing.assert_allclose(sum(ours_ll, []), sum(ref_ll, []), atol=TOL, rtol=0)
    assert ours_out["results"]["cfpo_tiny_mc"]["acc,none"] == ref_out["results"]["cfpo_tiny_mc"]["acc,none"]


def greedy_pair(ref, steps=2):
    """A (context, continuation) whose continuation is the reference model's argmax, as text. The
    random model's vocabulary (256) is larger than the tokenizer's, so contexts are tried until
    every argmax is an ordinary character the text can encode back."""
    import torch

    for context in (f"{c}{d}" for c in "abcdefghij" for d in "klmnopqrst"):
        ids = ref.tok_encode(context)
        for _ in range(steps):
            with torch.no_grad():
                ids.append(int(ref.model(torch.tensor([ids])).logits[0, -1].argmax()))
        if all(4 <= i < len(ref.tokenizer) for i in ids[-steps:]):
            return context, ref.tokenizer.decode(ids[-steps:])
    raise AssertionError("no context with a printable greedy continuation")


def test_rolling_loglikelihood_and_greedy_flags_match(models):
    ours, ref = models
    text = "The quick brown fox jumps over the lazy dog. " * 4  # 180 tokens: three 64-token windows
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0),
               Instance("loglikelihood_rolling", {}, ("short",), 1)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), ref.loglikelihood_rolling(rolling),
                               atol=TOL, rtol=0)
    # A continuation whose greedy flag is True under the reference, one False, one too long for
    # the window (left-truncated).
    pairs = [greedy_pair(ref), ("ab", " zzz"), ("x" * 80, " y")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours_ll, ref_ll = ours.loglikelihood(requests), ref.loglikelihood(requests)
    np.testing.assert_allclose([r[0] for r in ours_ll], [r[0] for r in ref_ll], atol=TOL, rtol=0)
    assert [r[1] for r in ours_ll] == [r[1] for r in ref_ll]
    assert ref_ll[0][1]


def test_greedy_generation_matches_the_hf_backend(models):
    ours, ref = models
    requests = [Instance("generate_until", {}, (context, {"until": ["q"], "max_gen_toks": 6, "do_sample": False}), i)
                for i, context in enumerate(["Question: 1 + 1?\nAnswer:", "hello", "abc abc abc"])]
    assert ours.generate_until(requests) == ref.generate_until(requests)


def test_alignment_tax_report_compares_two_checkpoints(checkpoint, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from cfpo_jax import config as config_lib
    from cfpo_jax import evaluate as evaluate_lib

    after = hf_fixtures.build_checkpoint("llama", tmp_path / "after", seed=2)
    config = config_lib.base_config()
    config.eval.lm_eval_tasks = ("cfpo_tiny_mc",)
    config.eval.lm_eval_include_path = TASK_DIR
    config.eval.lm_eval_batch_size = 8
    config.eval.lm_eval_limit = 8
    report = evaluate_lib.alignment_tax_report(config, checkpoint, after, str(tmp_path / "eval"))
    accuracies = []
    for path, key in ((checkpoint, "before"), (after, "after")):
        expected = evaluate(HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=8), limit=8)
        accuracies.append(expected["results"]["cfpo_tiny_mc"]["acc,none"])
        assert report[key]["results"]["cfpo_tiny_mc"]["acc,none"] == pytest.approx(accuracies[-1])
    before_acc, after_acc = accuracies
    assert set(report["relative_change"]["cfpo_tiny_mc"]) == {"acc,none"}  # scores only, no sample_len
    change = report["relative_change"]["cfpo_tiny_mc"]["acc,none"]
    if before_acc:
        assert change == pytest.approx((after_acc - before_acc) / before_acc)
    else:
        assert np.isnan(change)
    with open(tmp_path / "eval" / "lm_eval.json") as f:
        assert json.load(f)["relative_change"] == json.loads(json.dumps(report["relative_change"]))


def test_command_line_registers_the_model(checkpoint, tmp_path):
    """`python -m cfpo_jax.lm_eval` (a checkout on PYTHONPATH) is lm-eval's command line with
    "cfpo_jax" known."""
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.lm_eval", "--model", "cfpo_jax", "--model_args",
         f"pretrained={checkpoint},max_length={MAX_LENGTH}", "--tasks", "cfpo_tiny_mc",
         "--include_path", TASK_DIR, "--limit", "2", "--batch_size", "4",
         "--output_path", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cfpo_tiny_mc" in result.stdout and "acc" in result.stdout


def test_registering_the_model_keeps_lm_evals_own_models():
    """lm-eval imports its own model table only while its registry is empty: registering
    "cfpo_jax" first must not hide "hf" (a fresh interpreter, so nothing was imported before)."""
    result = subprocess.run(
        [sys.executable, "-c", "import cfpo_jax.lm_eval; from lm_eval.api.registry import get_model; "
         "print(get_model('cfpo_jax').__qualname__, get_model('hf').__qualname__)"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["CfpoJaxLM", "HFLM"]


def _installed_from_this_checkout() -> bool:
    """Whether the running environment holds a pip install of this checkout with its lm-eval
    start-up hook (CI's `pip install -e '.[test]'`)."""
    try:
        dist = importlib.metadata.distribution("cfpo_jax")
    except importlib.metadata.PackageNotFoundError:
        return False
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    return (url.startswith("file:")
            and os.path.realpath(url2pathname(urlparse(url).path)) == os.path.realpath(REPO)
            and any(file.name == "cfpo_jax_lm_eval.pth" for file in dist.files or ()))


def _throwaway_install(directory) -> str:
    """A virtual environment that sees every package of the running one and has this checkout
    pip-installed (editable, no dependencies); its interpreter."""
    venv.EnvBuilder(with_pip=False).create(directory)
    python = os.path.join(directory, "bin", "python")
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site_packages, "_running_env.pth"), "w") as f:
        for kind in sorted({"purelib", "platlib"}):
            f.write(f"import site; site.addsitedir({sysconfig.get_path(kind)!r})\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "-e", REPO],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return python


def test_bare_lm_eval_command_knows_the_model(checkpoint, models, tmp_path):
    """lm-eval's own `lm_eval` console script with `--model cfpo_jax`, once cfpo_jax is installed:
    no import of ours on its command line, no PYTHONPATH. Its accuracy and per-choice
    loglikelihoods are the hf backend's on the same checkpoint."""
    console = os.path.join(sysconfig.get_path("scripts"), "lm_eval")
    if not os.path.isfile(console):
        pytest.skip(f"lm-eval's console script is not installed ({console} is missing): pip install -e '.[eval]'")
    # CI installed this checkout already; elsewhere (a checkout on PYTHONPATH) install it into a
    # throwaway environment and run the same console script with that environment's interpreter.
    command = [] if _installed_from_this_checkout() else [_throwaway_install(tmp_path / "env")]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(  # dtype=auto as users pass it to `hf`: the checkpoint's float32
        [*command, console, "--model", "cfpo_jax", "--model_args",
         f"pretrained={checkpoint},max_length={MAX_LENGTH},dtype=auto", "--tasks", "cfpo_tiny_mc",
         "--include_path", TASK_DIR, "--limit", "8", "--batch_size", "4", "--log_samples",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cfpo_jax (" in result.stdout and "cfpo_tiny_mc" in result.stdout
    [results_file] = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    [samples_file] = glob.glob(str(tmp_path / "out" / "*" / "samples_cfpo_tiny_mc_*.jsonl"))
    with open(results_file) as f:
        accuracy = json.load(f)["results"]["cfpo_tiny_mc"]["acc,none"]
    with open(samples_file) as f:
        samples = sorted((json.loads(line) for line in f), key=lambda sample: sample["doc_id"])
    ref_out = evaluate(models[1], limit=8)
    ref_samples = sorted(ref_out["samples"]["cfpo_tiny_mc"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(ref_samples) == 8
    np.testing.assert_allclose([float(r[0]) for s in samples for r in s["filtered_resps"]],
                               [float(r[0]) for s in ref_samples for r in s["filtered_resps"]],
                               atol=TOL, rtol=0)
    assert accuracy == ref_out["results"]["cfpo_tiny_mc"]["acc,none"]
