"""cfpo_jax.study: the collapse rule on hand-made curves, the report from fixed metrics files, and
a reduced study (2 μ values, 1 seed, a few steps) run end to end through a kill and a resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from cfpo_jax import study as study_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- collapse


def _collapse(reward, entropy=None, skipped=None, *, delta=0.3, window=5, floor=0.05):
    n = len(reward)
    entropy = np.ones(n) if entropy is None else entropy
    skipped = np.zeros(n) if skipped is None else skipped
    return study_lib.collapse(reward, entropy, skipped, delta=delta, window=window,
                              entropy_floor=floor)


def test_rising_noisy_reward_does_not_collapse():
    steps = np.arange(100)
    wiggle = 0.1 * (-1.0) ** steps  # ±0.1 per step: a 5-step mean moves by 0.02 at most
    assert _collapse(0.2 + 0.005 * steps + wiggle) is None


def test_reward_drop_collapses_at_the_first_window_past_delta():
    # 0.8 for 30 steps, then 0.2. 5-step means: index 30 → 0.68, 31 → 0.56, 32 → 0.44, i.e. a
    # drawdown of 0.12, 0.24, 0.36: the first one above δ = 0.3 is at index 32.
    reward = np.r_[np.full(30, 0.8), np.full(30, 0.2)]
    assert _collapse(reward) == (32, "reward")
    # A later recovery does not undo it (the final reward shows the recovery instead).
    assert _collapse(np.r_[reward, np.full(30, 0.9)]) == (32, "reward")
    # A drop of 0.25 is within δ.
    assert _collapse(np.r_[np.full(30, 0.8), np.full(30, 0.55)]) is None


def test_entropy_below_floor_collapses():
    # Entropy 1.0 − 0.01·t: the 5-step mean at index i is 1 − 0.01·(i − 2), first below 0.505 at i = 52.
    entropy = 1.0 - 0.01 * np.arange(80)
    assert _collapse(np.full(80, 0.5), entropy, floor=0.505) == (52, "entropy")


def test_non_finite_reward_or_skipped_update_collapses_first():
    reward = np.r_[np.full(30, 0.8), np.full(30, 0.2)]  # a reward collapse at index 32
    with_nan = reward.copy()
    with_nan[40] = np.nan
    assert _collapse(with_nan) == (32, "reward")
    with_nan[7] = np.nan
    assert _collapse(with_nan) == (7, "non-finite")
    skipped = np.r_[np.zeros(12), np.ones(48)]  # the running count steps up at index 12
    assert _collapse(reward, skipped=skipped) == (12, "non-finite")


def test_too_short_for_a_window_only_checks_finiteness():
    assert _collapse([0.9, 0.1, 0.0]) is None
    assert _collapse([0.9, math.inf, 0.0]) == (1, "non-finite")


# ----------------------------------------------------------------------------- report


def _spec(output_dir, **kw):
    s = ml_collections.ConfigDict()
    s.name = "fixed"
    s.output_dir = str(output_dir)
    s.objectives = ("cfpo", "ppo")
    s.num_epochs = (1,)
    s.num_minibatches = (1,)
    s.seeds = (0, 1)
    s.overrides = ml_collections.ConfigDict()
    s.collapse = ml_collections.ConfigDict(dict(delta=0.5, window=2, entropy_floor=0.1))
    s.late_fraction = 0.5
    s.eval_metric = "eval/arithmetic/greedy"
    s.update(kw)
    return s


def _quickstart():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    return quickstart.get_config()


def _write_run(path, rewards, late, greedy, early_rewards=None):
    """metrics.jsonl with `rewards` per step; every late metric is 9.0 in the first half of the
    steps and `late[k]` in the second; a final eval record. `early_rewards`: records of a killed
    earlier attempt, written first (a resumed run re-writes those steps)."""
    os.makedirs(path)
    n = len(rewards)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, reward in enumerate(early_rewards or [], 1):
            f.write(json.dumps(dict(step=step, reward_mean=reward, entropy=5.0, skipped_updates=0)) + "\n")
        for step, reward in enumerate(rewards, 1):
            record = dict(step=step, reward_mean=reward, skipped_updates=0)
            for key in study_lib.LATE_METRICS:
                record[key] = late[key] if step > n // 2 else 9.0
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"step": n, "eval/arithmetic/greedy": greedy}) + "\n")


def test_report_table_from_fixed_metrics(tmp_path):
    late = lambda v: dict(clip_frac=v, ratio_dev=2 * v, ppo_kl=v / 10, entropy=0.5 + v,
                          grad_norm=10 * v, response_len_mean=3 + v)
    runs = tmp_path / "runs"
    # window 2: cfpo seed 0 means [0.2, 0.4, 0.6], seed 1 [0.4, 0.6, 0.8];
    # ppo seed 0 [0.9, 0.5, 0.1]: a drawdown of 0.8 > δ = 0.5 at mean index 2 → step 4;
    # ppo seed 1 constant 0.5. ppo seed 0 was killed after step 3 once: its first records are stale.
    _write_run(runs / "cfpo_mu1_mb1_seed0", [0.1, 0.3, 0.5, 0.7], late(0.1), 0.60)
    _write_run(runs / "cfpo_mu1_mb1_seed1", [0.3, 0.5, 0.7, 0.9], late(0.3), 0.70)
    _write_run(runs / "ppo_mu1_mb1_seed0", [0.9, 0.9, 0.1, 0.1], late(0.2), 0.20,
               early_rewards=[0.0, 0.0, 0.0])
    _write_run(runs / "ppo_mu1_mb1_seed1", [0.5, 0.5, 0.5, 0.5], late(0.6), 0.40)
    for name, wall in [("cfpo_mu1_mb1_seed0", 12.4), ("cfpo_mu1_mb1_seed1", 20.0),
                       ("ppo_mu1_mb1_seed0", 31.0), ("ppo_mu1_mb1_seed1", 9.6)]:
        (runs / name / "finished.json").write_text(json.dumps({"wall_s": wall}))
    # A third seed cut short: listed, but kept out of the means.
    _write_run(runs / "cfpo_mu1_mb1_seed2", [0.0, 0.0], late(5.0), 0.0)

    study = study_lib.Study(spec=_spec(tmp_path, seeds=(0, 1, 2)), base=_quickstart(),
                            base_file="configs/quickstart.py", study_file="fixed.py")
    text = study_lib.write_report(study, plot=False)
    assert "6 runs, 4 finished, 1 unfinished" in text
    # mean ± sample std by hand: (0.6, 0.8) → 0.700 ± 0.141; (0.1, 0.5) → 0.300 ± 0.283; etc.
    expected = "\n".join([
        "| objective | μ | batch ratio | seeds | final reward | best reward | held-out | collapse step "
        "| clip_frac | ratio_dev | ppo_kl | entropy | grad_norm | response len |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| CFPO | 1 | 1 | 2 | 0.700 ± 0.141 | 0.700 ± 0.141 | 0.650 ± 0.071 | none | 0.200 ± 0.141 "
        "| 0.400 ± 0.283 | 0.020 ± 0.014 | 0.700 ± 0.141 | 2.000 ± 1.414 | 3.200 ± 0.141 |",
        "| GRPO | 1 | 1 | 2 | 0.300 ± 0.283 | 0.700 ± 0.283 | 0.300 ± 0.141 | 1/2: 4 (reward) "
        "| 0.400 ± 0.283 | 0.800 ± 0.566 | 0.040 ± 0.028 | 0.900 ± 0.283 | 4.000 ± 2.828 | 3.400 ± 0.283 |",
    ])
    assert expected in text, text
    assert "| cfpo_mu1_mb1_seed0 | CFPO | 1 | 1 | 0 | 4 | 0.600 | 0.600 | none | 12 s |" in text
    assert "| ppo_mu1_mb1_seed0 | GRPO | 1 | 1 | 0 | 4 | 0.100 | 0.900 | 4 (reward) | 31 s |" in text
    assert "| cfpo_mu1_mb1_seed2 | CFPO | 1 | 1 | 2 | 2 | 0.000 | 0.000 | none | — |" in text
    assert (tmp_path / "report.md").read_text() == text


def test_plots_are_written(tmp_path):
    runs = tmp_path / "runs"
    late = dict.fromkeys(study_lib.LATE_METRICS, 0.5)
    for name, rewards in [("cfpo_mu1_mb1_seed0", [0.1, 0.2, 0.4, 0.5]),
                          ("ppo_mu1_mb1_seed0", [0.1, 0.3, 0.2, 0.1])]:
        _write_run(runs / name, rewards, late, 0.5)
        (runs / name / "finished.json").write_text('{"wall_s": 1.0}')
    study = study_lib.Study(spec=_spec(tmp_path, seeds=(0,)), base=_quickstart(),
                            base_file="configs/quickstart.py", study_file="fixed.py")
    text = study_lib.write_report(study)
    for name in ("reward", "entropy", "ratio_dev", "clip_frac"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name}.png)" in text


def test_an_override_of_a_missing_field_fails_before_anything_runs(tmp_path):
    spec = _spec(tmp_path)
    spec.overrides.train = ml_collections.ConfigDict({"num_stepz": 3})
    study = study_lib.Study(spec=spec, base=_quickstart(), base_file="configs/quickstart.py")
    with pytest.raises(ValueError, match="train.num_stepz"):
        study_lib.run_all(study, parallel=1)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- end to end


def _study_command(output_dir):
    return [sys.executable, "-m", "cfpo_jax.study", "--config=configs/quickstart.py",
            "--study=configs/studies/stability_quickstart.py", f"--study.output_dir={output_dir}",
            "--study.num_epochs=(1, 4)", "--study.seeds=(0,)", "--parallel=2",
            "--config.train.num_steps=6", "--config.train.checkpoint_every=2",
            # No warm start and no final evaluation: two compilations fewer per run.
            "--config.warmstart.steps=0", "--config.eval.sources=()"]


def test_reduced_study_end_to_end_resumes_after_a_kill(tmp_path):
    """2 μ × 2 objectives × 1 seed, 6 steps each. The study is killed (SIGKILL: its runs get
    SIGTERM from the kernel and checkpoint) once a run has passed its step-2 checkpoint; run again,
    it keeps finished runs, resumes the killed ones from their checkpoints, and writes the report."""
    out = tmp_path / "study"
    # The runs use one CPU device, as a user's would: not the 8 fake devices of this test session,
    # whose cross-device rendezvous can time out (and abort) on a loaded machine.
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": xla_flags}
    proc = subprocess.Popen(_study_command(out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 1800  # generous: a shared machine can be many times slower
    runs_dir = out / "runs"
    checkpointed = lambda: [d for d in (runs_dir.iterdir() if runs_dir.exists() else ())
                            if (d / "checkpoints" / "2").exists()]
    while not checkpointed() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert checkpointed() and proc.poll() is None, proc.stdout.read() if proc.poll() else "too slow"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the runs' SIGTERM handlers save and exit
    finished_before = {d.name for d in runs_dir.iterdir() if (d / "finished.json").exists()}
    assert len(finished_before) < 4

    out_text = subprocess.run(_study_command(out), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1800)
    assert out_text.returncode == 0, out_text.stdout + out_text.stderr
    assert f"{len(finished_before)} already finished" in out_text.stdout
    resumed = [d for d in runs_dir.iterdir() if "resumed from step" in (d / "train.log").read_text()]
    assert resumed, "no killed run resumed from its checkpoint"
    for d in runs_dir.iterdir():
        if d.name in finished_before:
            assert (d / "command.sh").exists() and "start " + d.name not in out_text.stdout
        records = study_lib.read_metrics(str(d))
        assert sorted(s for s, r in records.items() if "reward_mean" in r) == list(range(1, 7))

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith(("| CFPO |", "| GRPO |"))]
    assert [row.split(" | ")[:3] for row in table] == [
        ["| CFPO", "1", "1"], ["| GRPO", "1", "1"], ["| CFPO", "4", "1"], ["| GRPO", "4", "1"]]
    assert all((out / f"{n}.png").exists() for n in ("reward", "entropy", "ratio_dev", "clip_frac"))
