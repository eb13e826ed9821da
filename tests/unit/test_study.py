"""cfpo_jax.study and cfpo_jax.stability: the collapse / dip rule on hand-made curves, Fisher's test
on hand-made counts, the axes (names, commands, the last round's study files), the report and the
map from fixed metrics files, and a reduced map (2 μ values, 1 learning rate, 1 seed, a few steps)
run end to end through a kill and a resume."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from cfpo_jax import stability
from cfpo_jax import study as study_lib
from tests.fixtures import paths
from tests.fixtures.runs import quickstart

ROOT = paths.ROOT


# ----------------------------------------------------------------------------- collapse and dips


def _outcome(reward, entropy=None, skipped=None, *, delta=0.3, window=5, floor=0.05):
    n = len(reward)
    entropy = np.ones(n) if entropy is None else entropy
    skipped = np.zeros(n) if skipped is None else skipped
    found = stability.outcome(reward, entropy, skipped, delta=delta, window=window,
                              entropy_floor=floor)
    return found.collapse, found.dips


def test_rising_noisy_reward_neither_collapses_nor_dips():
    steps = np.arange(100)
    wiggle = 0.1 * (-1.0) ** steps  # ±0.1 per step: a 5-step mean moves by 0.02 at most
    assert _outcome(0.2 + 0.005 * steps + wiggle) == (None, ())


def test_a_drop_to_the_end_collapses_a_drop_that_recovers_dips():
    # 0.8 for 30 steps, then 0.2. 5-step means: index 30 → 0.68, 31 → 0.56, 32 → 0.44, i.e. a
    # drawdown of 0.12, 0.24, 0.36: the first one above δ = 0.3 is at index 32, down to the end.
    drop = np.r_[np.full(30, 0.8), np.full(30, 0.2)]
    assert _outcome(drop) == ((32, "reward"), ())
    # Then 0.9 from index 60: means 0.34 (index 60), 0.48 (61), 0.62 (62): drawdowns 0.46, 0.32,
    # 0.18 — back within δ at 62, so the drop is a dip starting at 32, and nothing collapsed.
    assert _outcome(np.r_[drop, np.full(30, 0.9)]) == (None, ((32, "reward"),))
    # Dip, recovery to 0.9 (the new best), then a fall to 0.3 for good: means from index 90 are
    # 0.78, 0.66, 0.54 → drawdowns 0.12, 0.24, 0.36: the collapse starts at 92, the dip stays.
    assert _outcome(np.r_[drop, np.full(30, 0.9), np.full(20, 0.3)]) == (
        (92, "reward"), ((32, "reward"),))
    # A drop of 0.25 is within δ: neither.
    assert _outcome(np.r_[np.full(30, 0.8), np.full(30, 0.55)]) == (None, ())


def test_a_fall_within_the_first_window_is_measured_against_the_start():
    # 0.4 for 3 steps, then 0.05 (window 10, δ = 0.15). Means of all steps so far: 0.4, 0.4, 0.4,
    # 0.3125 (index 3, drawdown 0.0875), 0.26 (0.14), 0.225 (index 5, 0.175 > δ), and lower from
    # there: a collapse at 5. Full 10-step windows alone (best 0.155) would see a 0.105 drop only.
    reward = np.r_[np.full(3, 0.4), np.full(40, 0.05)]
    assert _outcome(reward, window=10, delta=0.15) == ((5, "reward"), ())
    # A fall at the first update, as the quickstart at lr 1.5e-3 did (0.38, then ~0.01).
    assert _outcome(np.r_[0.38, np.full(30, 0.01)], window=10, delta=0.15) == ((1, "reward"), ())
    assert stability.trailing_means([1.0, 2.0, 3.0, 4.0], 3).tolist() == [1.0, 1.5, 2.0, 3.0]


def test_back_means_within_half_delta_of_the_best():
    # Window 1, δ = 0.3. Drawdowns 0, 0.35, 0.2, 0.2, 0.2: down at 1 and never back within 0.15 —
    # a collapse at 1, though the run sits under δ from index 2 on.
    assert _outcome([0.8, 0.45, 0.6, 0.6, 0.6], window=1) == ((1, "reward"), ())
    # Back to a drawdown of 0.1 at index 3: a dip at 1.
    assert _outcome([0.8, 0.45, 0.6, 0.7, 0.7], window=1) == (None, ((1, "reward"),))


def test_a_run_that_ends_in_an_unfinished_recovery_is_a_collapse():
    # Back up to 0.6 at the end: the last 5-step mean is 0.6, 0.2 below the best 0.8 (> δ = 0.15).
    reward = np.r_[np.full(30, 0.8), np.full(20, 0.2), np.full(10, 0.6)]
    # 5-step means 0.68 (30), 0.56 (31): drawdown 0.24 > 0.15 first at 31, never back within 0.15.
    assert _outcome(reward, delta=0.15) == ((31, "reward"), ())


def test_entropy_under_the_floor_collapses_or_dips():
    # Entropy 1.0 − 0.01·t: the 5-step mean at index i is 1 − 0.01·(i − 2), first below 0.505 at i = 52.
    entropy = 1.0 - 0.01 * np.arange(80)
    assert _outcome(np.full(80, 0.5), entropy, floor=0.505) == ((52, "entropy"), ())
    # Entropy 0.01 for steps 20..29 only. A 5-step mean with k such steps is ((5 − k) + 0.01·k)/5:
    # index 21 (k = 2) 0.604, 22 (k = 3) 0.406 < 0.5, ..., 31 (k = 3) 0.406, 32 (k = 2) 0.604.
    # Down over 22..31, then back: a dip at 22, no collapse.
    entropy = np.ones(60)
    entropy[20:30] = 0.01
    assert _outcome(np.full(60, 0.5), entropy, floor=0.5) == (None, ((22, "entropy"),))


def test_non_finite_reward_or_skipped_update_collapses_whatever_follows():
    reward = np.r_[np.full(30, 0.8), np.full(30, 0.2)]  # a reward collapse at index 32
    with_nan = reward.copy()
    with_nan[40] = np.nan
    assert _outcome(with_nan)[0] == (32, "reward")
    with_nan[7] = np.nan
    assert _outcome(with_nan)[0] == (7, "non-finite")
    skipped = np.r_[np.zeros(12), np.ones(48)]  # the running count steps up at index 12
    assert _outcome(np.full(60, 0.5), skipped=skipped) == ((12, "non-finite"), ())


def test_a_run_shorter_than_a_window_is_judged_on_the_steps_it_has():
    # Means so far 0.9, 0.5, 0.333: drawdowns 0.4 and 0.567 > δ = 0.3 from index 1 to the end.
    assert _outcome([0.9, 0.1, 0.0]) == ((1, "reward"), ())
    assert _outcome([0.5, 0.4, 0.45]) == (None, ())
    assert _outcome([0.9, math.inf, 0.0]) == ((1, "non-finite"), ())


# ----------------------------------------------------------------------------- significance


def _fisher_two_sided_by_hand(a, b, c, d):
    """Σ of the hypergeometric probabilities of every table with the margins of [[a, b], [c, d]]
    that is no more likely than it: P(k) = C(a+c, k)·C(b+d, a+b−k) / C(n, a+b)."""
    row, col, n = a + b, a + c, a + b + c + d
    p = lambda k: math.comb(col, k) * math.comb(n - col, row - k) / math.comb(n, row)
    observed = p(a)
    return sum(p(k) for k in range(max(0, row + col - n), min(row, col) + 1)
               if p(k) <= observed * (1 + 1e-9))


def test_fisher_exact_test_on_hand_made_counts():
    # 5/5 vs 0/5: the two extreme tables, each 1/C(10, 5) = 1/252.
    assert stability.fisher_p(5, 5, 0, 5) == pytest.approx(2 / 252, rel=1e-12)
    # 3/5 vs 0/5: P(k) = C(3,k)·C(7,5−k)/252 = 21, 105, 105, 21 (/252); as or less likely than
    # k = 3: k = 0 and 3 → 42/252 = 1/6.
    assert stability.fisher_p(3, 5, 0, 5) == pytest.approx(1 / 6, rel=1e-12)
    assert stability.fisher_p(2, 2, 0, 2) == pytest.approx(1 / 3, rel=1e-12)
    assert stability.fisher_p(1, 2, 1, 2) == pytest.approx(1.0)
    assert stability.fisher_p(0, 3, 0, 4) == pytest.approx(1.0)
    for counts in [(1, 6, 5, 6), (0, 5, 4, 7), (2, 9, 7, 8), (3, 3, 1, 5)]:
        k_a, n_a, k_b, n_b = counts
        assert stability.fisher_p(*counts) == pytest.approx(
            _fisher_two_sided_by_hand(k_a, n_a - k_a, k_b, n_b - k_b), rel=1e-9), counts


# ----------------------------------------------------------------------------- report


def _spec(output_dir, **kw):
    """A study file in the last round's format (objectives / num_epochs / num_minibatches)."""
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

    study = study_lib.Study(spec=_spec(tmp_path, seeds=(0, 1, 2)), base=quickstart(),
                            base_file="configs/quickstart.py", study_file="fixed.py")
    text = study_lib.write_report(study, plot=False)
    assert "6 runs, 4 finished, 1 unfinished" in text
    # mean ± sample std by hand: (0.6, 0.8) → 0.700 ± 0.141; (0.1, 0.5) → 0.300 ± 0.283; etc.
    expected = "\n".join([
        "| objective | μ | batch ratio | seeds | final reward | best reward | held-out | collapse step "
        "| dip step | clip_frac | ratio_dev | ppo_kl | entropy | grad_norm | response len |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| CFPO | 1 | 1 | 2 | 0.700 ± 0.141 | 0.700 ± 0.141 | 0.650 ± 0.071 | none | none "
        "| 0.200 ± 0.141 | 0.400 ± 0.283 | 0.020 ± 0.014 | 0.700 ± 0.141 | 2.000 ± 1.414 "
        "| 3.200 ± 0.141 |",
        "| GRPO | 1 | 1 | 2 | 0.300 ± 0.283 | 0.700 ± 0.283 | 0.300 ± 0.141 | 1/2: 4 (reward) | none "
        "| 0.400 ± 0.283 | 0.800 ± 0.566 | 0.040 ± 0.028 | 0.900 ± 0.283 | 4.000 ± 2.828 "
        "| 3.400 ± 0.283 |",
    ])
    assert expected in text, text
    assert "| cfpo_mu1_mb1_seed0 | CFPO | 1 | 1 | 0 | 4 | 0.600 | 0.600 | none | none | 12 s |" in text
    assert "| ppo_mu1_mb1_seed0 | GRPO | 1 | 1 | 0 | 4 | 0.100 | 0.900 | 4 (reward) | none | 31 s |" in text
    assert "| cfpo_mu1_mb1_seed2 | CFPO | 1 | 1 | 2 | 2 | 0.000 | 0.000 | none | none | — |" in text
    assert "**Partial**: 4 of the 6 planned runs" in text
    assert (tmp_path / "report.md").read_text() == text


def test_plots_are_written(tmp_path):
    runs = tmp_path / "runs"
    late = dict.fromkeys(study_lib.LATE_METRICS, 0.5)
    for name, rewards in [("cfpo_mu1_mb1_seed0", [0.1, 0.2, 0.4, 0.5]),
                          ("ppo_mu1_mb1_seed0", [0.1, 0.3, 0.2, 0.1])]:
        _write_run(runs / name, rewards, late, 0.5)
        (runs / name / "finished.json").write_text('{"wall_s": 1.0}')
    study = study_lib.Study(spec=_spec(tmp_path, seeds=(0,)), base=quickstart(),
                            base_file="configs/quickstart.py", study_file="fixed.py")
    text = study_lib.write_report(study)
    for name in ("reward", "entropy", "ratio_dev", "clip_frac"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name}.png)" in text


def test_an_override_of_a_missing_field_fails_before_anything_runs(tmp_path):
    spec = _spec(tmp_path)
    spec.overrides.train = ml_collections.ConfigDict({"num_stepz": 3})
    study = study_lib.Study(spec=spec, base=quickstart(), base_file="configs/quickstart.py")
    with pytest.raises(ValueError, match="train.num_stepz"):
        study_lib.run_all(study, parallel=1)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- axes


def _axes_spec(output_dir, axes: dict, **kw):
    """A study file in the axes format; `axes` maps config paths to values."""
    s = _spec(output_dir, **kw)
    for key in ("objectives", "num_epochs", "num_minibatches"):
        del s[key]
    s.axes = ml_collections.ConfigDict()
    for path, values in axes.items():
        section, key = path.rsplit(".", 1) if "." in path else ("", path)
        node = s.axes
        for part in filter(None, section.split(".")):
            if part not in node:
                node[part] = ml_collections.ConfigDict()
            node = node[part]
        node[key] = values
    return s


def test_any_config_field_is_an_axis_and_names_the_runs(tmp_path):
    spec = _axes_spec(tmp_path, {"rl.objective": ("cfpo", "ppo"), "optim.lr": (7e-4, 1.5e-3),
                                 "rl.eps": (0.2,), "model.path": ("tiny", "/models/My Model")},
                      seeds=(3,))
    study = study_lib.Study(spec=spec, base=quickstart(), base_file="configs/quickstart.py")
    assert [a.path for a in study.axes] == ["rl.objective", "model.path", "optim.lr", "rl.eps"]
    runs = study.runs()
    # Seeds outermost, then the axes in order with the objective fastest.
    assert [r.name for r in runs] == [
        "cfpo_pathtiny_lr0.0007_eps0.2_seed3", "ppo_pathtiny_lr0.0007_eps0.2_seed3",
        "cfpo_pathtiny_lr0.0015_eps0.2_seed3", "ppo_pathtiny_lr0.0015_eps0.2_seed3",
        "cfpo_pathmodels-My-Model_lr0.0007_eps0.2_seed3", "ppo_pathmodels-My-Model_lr0.0007_eps0.2_seed3",
        "cfpo_pathmodels-My-Model_lr0.0015_eps0.2_seed3", "ppo_pathmodels-My-Model_lr0.0015_eps0.2_seed3"]
    command = study.command(runs[7])
    for flag in ("--config.rl.objective=ppo", "--config.model.path=/models/My Model",
                 "--config.optim.lr=0.0015", "--config.rl.eps=0.2", "--config.seed=3",
                 "--config.data.seed=3"):
        assert flag in command, command
    assert f"--workdir={tmp_path}/runs/ppo_pathmodels-My-Model_lr0.0015_eps0.2_seed3" in command
    config = study.config(runs[2])
    assert (config.rl.objective, config.optim.lr, config.rl.eps, config.model.path) == (
        "cfpo", 1.5e-3, 0.2, "tiny")


def test_linked_axes_take_their_values_in_step(tmp_path):
    """`linked`: the i-th value of each linked axis together, every combination with the rest."""
    spec = _axes_spec(tmp_path, {"rl.objective": ("cfpo", "ppo"), "rl.max_staleness": (0, 2),
                                 "rl.ratio_reference": ("recomputed", "behaviour"),
                                 "rl.rollout_correction": ("tis", "none")}, seeds=(0,))
    spec.linked = (("rl.ratio_reference", "rl.rollout_correction"),)
    study = study_lib.Study(spec=spec, base=quickstart(), base_file="configs/quickstart.py")
    cells = [(r.value("rl.objective"), r.value("rl.max_staleness"), r.value("rl.ratio_reference"),
              r.value("rl.rollout_correction")) for r in study.runs()]
    expected = [(o, k, ref, corr) for ref, corr in (("recomputed", "tis"), ("behaviour", "none"))
                for k in (0, 2) for o in ("cfpo", "ppo")]
    assert sorted(cells) == sorted(expected) and len(cells) == len(set(cells)) == 8
    assert [c[0] for c in cells[:2]] == ["cfpo", "ppo"]  # the objective still varies fastest
    for run in study.runs():
        study.config(run)  # (behaviour, tis) would fail validation: it is not in the grid

    for linked, message in [((("rl.ratio_reference", "rl.eps"),), "not axes: \\['rl.eps'\\]"),
                            ((("rl.ratio_reference",),), "two or more"),
                            ((("rl.ratio_reference", "rl.max_staleness"),
                              ("rl.max_staleness", "rl.rollout_correction")), "in two groups")]:
        spec.linked = linked
        with pytest.raises(ValueError, match=message):
            study_lib.Study(spec=spec, base=quickstart(), base_file="q.py").runs()
    spec.axes.rl.max_staleness = (0, 1, 2)
    spec.linked = (("rl.ratio_reference", "rl.max_staleness"),)
    with pytest.raises(ValueError, match="as many values each; got \\[2, 3\\]"):
        study_lib.Study(spec=spec, base=quickstart(), base_file="q.py").runs()


def test_the_map_has_one_section_per_linked_combination(tmp_path):
    """Linked axes outside the map's x and y: a section (and plot) per pair the study runs, none
    for the pairs it never runs."""
    spec = _axes_spec(tmp_path, {"rl.objective": ("cfpo", "ppo"), "rl.max_staleness": (0, 2),
                                 "rl.ratio_reference": ("recomputed", "behaviour"),
                                 "rl.rollout_correction": ("tis", "none"), "optim.lr": (1e-3,)},
                      seeds=(0,), eval_metric="")
    spec.linked = (("rl.ratio_reference", "rl.rollout_correction"),)
    spec.map = ml_collections.ConfigDict(dict(x="rl.max_staleness", y="optim.lr"))
    study = study_lib.Study(spec=spec, base=quickstart(), base_file="configs/quickstart.py")
    for run in study.runs():
        _write_curve(study.workdir(run), [0.5] * 4, {})
    text = study_lib.write_report(study, plot=False)
    sections = [line for line in text.splitlines() if line.startswith("### ")]
    assert sections == ["### rl.ratio_reference = recomputed, rl.rollout_correction = tis",
                        "### rl.ratio_reference = behaviour, rl.rollout_correction = none"], sections


def test_bad_axes_fail_with_the_bad_value(tmp_path):
    base = quickstart()
    make = lambda axes: study_lib.Study(spec=_axes_spec(tmp_path, axes), base=base, base_file="q.py")
    with pytest.raises(ValueError, match="'optim.lr'.*tuple of distinct values.*0.001"):
        make({"optim.lr": 0.001})
    with pytest.raises(ValueError, match="'optim.lr'.*distinct"):
        make({"optim.lr": (0.001, 1e-3)})
    with pytest.raises(ValueError, match="'data.seed': seeds are the study file's `seeds`"):
        make({"data.seed": (0, 1)})
    with pytest.raises(ValueError, match="share the name 'patha-b_seed0'"):
        make({"model.path": ("a/b", "a b")}).runs()
    study = make({"optim.lrr": (0.001,)})
    with pytest.raises(ValueError, match="'optim.lrr': the training config has no such field"):
        study.config(study.runs()[0])
    spec = _axes_spec(tmp_path, {"rl.objective": ("cfpo",), "optim.lr": (0.001,)})
    spec.map = ml_collections.ConfigDict(dict(x="rl.num_epochs", y="optim.lr"))
    with pytest.raises(ValueError, match="map.x='rl.num_epochs' is not an axis"):
        study_lib.write_report(study_lib.Study(spec=spec, base=base, base_file="q.py"), plot=False)


def load_study_file(name):
    path = os.path.join(ROOT, "configs", "studies", f"{name}.py")
    namespace = {}
    exec(compile(open(path).read(), path, "exec"), namespace)
    return namespace["get_config"]()


def test_a_study_file_of_the_last_round_runs_the_same_commands_as_its_migration(tmp_path):
    """The committed stability_quickstart.py, migrated to `axes`, against its last-round form
    (top-level objectives / num_epochs / num_minibatches): the same runs, names and commands, so a
    study started with the old file resumes under the new one."""
    migrated = load_study_file("stability_quickstart")
    old = ml_collections.ConfigDict(migrated.to_dict())
    del old["axes"]
    old.objectives, old.num_epochs, old.num_minibatches = ("cfpo", "ppo"), (1, 8, 16), (1,)
    new_study, old_study = (study_lib.Study(spec=s, base=quickstart(), base_file="configs/quickstart.py")
                            for s in (migrated, old))
    names = [r.name for r in old_study.runs()]
    assert names[:6] == ["cfpo_mu1_mb1_seed0", "ppo_mu1_mb1_seed0", "cfpo_mu8_mb1_seed0",
                         "ppo_mu8_mb1_seed0", "cfpo_mu16_mb1_seed0", "ppo_mu16_mb1_seed0"]
    assert len(names) == 18 and [r.name for r in new_study.runs()] == names
    assert [new_study.command(r) for r in new_study.runs()] == [
        old_study.command(r) for r in old_study.runs()]
    # The last round's exact flags for one run.
    assert old_study.command(old_study.runs()[3])[-5:] == [
        "--config.rl.objective=ppo", "--config.rl.num_epochs=8", "--config.rl.num_minibatches=1",
        "--config.seed=0", "--config.data.seed=0"]


# ----------------------------------------------------------------------------- the map


def _write_curve(path, rewards, late, wall=1.0):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, reward in enumerate(rewards, 1):
            record = {"step": step, "reward_mean": reward, "skipped_updates": 0,
                      **dict.fromkeys(study_lib.LATE_METRICS, 0.0), **late}
            f.write(json.dumps(record) + "\n")
    if wall is not None:
        with open(os.path.join(path, "finished.json"), "w") as f:
            json.dump({"wall_s": wall}, f)


def test_map_numbers_from_fixed_metrics_files(tmp_path):
    """μ ∈ {1, 8, 16} × lr ∈ {1e-3, 2e-3, 4e-3} × 2 objectives × 2 seeds, some runs missing. Window 2,
    δ = 0.5: FLAT never drops (final 0.5); COLLAPSE ends 0.8 below its best (final 0.1); DIP drops
    0.8 and comes back (final 0.9)."""
    FLAT, COLLAPSE, DIP = [0.5] * 4, [0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1, 0.9, 0.9]
    curves = {  # (objective, μ, lr) -> the curve of seed 0, seed 1 (None: no run on disk)
        ("cfpo", 1, 1e-3): (FLAT, FLAT), ("cfpo", 8, 1e-3): (DIP, FLAT),
        ("cfpo", 16, 1e-3): (FLAT, None),
        ("cfpo", 1, 2e-3): (FLAT, FLAT), ("cfpo", 8, 2e-3): (None, None),
        ("cfpo", 16, 2e-3): (COLLAPSE, FLAT),
        ("ppo", 1, 1e-3): (FLAT, FLAT), ("ppo", 8, 1e-3): (COLLAPSE, COLLAPSE),
        ("ppo", 16, 1e-3): (FLAT, FLAT),
        ("ppo", 1, 2e-3): (COLLAPSE, FLAT), ("ppo", 8, 2e-3): (COLLAPSE, COLLAPSE),
        ("ppo", 16, 2e-3): (None, None),
        ("cfpo", 1, 4e-3): (FLAT, None),  # the only run at lr 4e-3
    }
    for (objective, mu, lr), pair in curves.items():
        for seed, curve in enumerate(pair):
            if curve is None:
                continue
            # late-run diagnostics: ratio_dev 0.01 (CFPO) / 0.03 (GRPO), + 0.01 for seed 1.
            ratio_dev = (0.01 if objective == "cfpo" else 0.03) + 0.01 * seed
            late = dict(ratio_dev=ratio_dev, clip_frac=2 * ratio_dev, entropy=0.5 - ratio_dev)
            _write_curve(tmp_path / "runs" / f"{objective}_lr{lr:g}_mu{mu}_seed{seed}", curve, late)
    # A run cut short: on disk, not finished, so not in the map.
    _write_curve(tmp_path / "runs" / "ppo_lr0.002_mu16_seed0", COLLAPSE, {}, wall=None)
    spec = _axes_spec(tmp_path, {"rl.objective": ("cfpo", "ppo"), "rl.num_epochs": (1, 8, 16),
                                 "optim.lr": (1e-3, 2e-3, 4e-3)}, eval_metric="")
    spec.map = ml_collections.ConfigDict(dict(x="rl.num_epochs", y="optim.lr"))
    study = study_lib.Study(spec=spec, base=quickstart(), base_file="configs/quickstart.py",
                            study_file="map.py")
    text = study_lib.write_report(study)
    assert "36 runs, 20 finished, 1 unfinished" in text and "**Partial**: 20 of the 36" in text
    # Frontier: the largest μ with no collapse there or below; unmeasured cells skipped.
    assert ("- frontier of CFPO: optim.lr 0.001 → μ 16; optim.lr 0.002 → μ 1; "
            "optim.lr 0.004 → μ ≥ 1 (μ > 1 not measured)") in text
    assert ("- frontier of GRPO: optim.lr 0.001 → μ 1; optim.lr 0.002 → none; "
            "optim.lr 0.004 → not measured") in text
    # Fisher p by hand: 0/2 vs 2/2 → 2 of C(4, 2) = 6 tables → 1/3; 0/2 vs 1/2 → 1; 0/x vs 0/y → 1.
    # Means: CFPO μ = 8 final (0.9 + 0.5)/2; ratio_dev (0.01 + 0.02)/2; GRPO (0.03 + 0.04)/2.
    expected = "\n".join([
        "| μ | optim.lr | CFPO collapsed | GRPO collapsed | p (CFPO vs GRPO) | CFPO dips | GRPO dips "
        "| CFPO final | GRPO final | CFPO ratio_dev | GRPO ratio_dev | CFPO clip_frac "
        "| GRPO clip_frac | CFPO entropy | GRPO entropy |",
        "|" + "---|" * 15,
        "| 1 | 0.001 | 0/2 | 0/2 | 1.000 | 0/2 | 0/2 | 0.500 | 0.500 | 0.015 | 0.035 | 0.030 | 0.070 "
        "| 0.485 | 0.465 |",
        "| 8 | 0.001 | 0/2 | 2/2 | 0.333 | 1/2 | 0/2 | 0.700 | 0.100 | 0.015 | 0.035 | 0.030 | 0.070 "
        "| 0.485 | 0.465 |",
        "| 16 | 0.001 | 0/1 | 0/2 | 1.000 | 0/1 | 0/2 | 0.500 | 0.500 | 0.010 | 0.035 | 0.020 | 0.070 "
        "| 0.490 | 0.465 |",
        "| 1 | 0.002 | 0/2 | 1/2 | 1.000 | 0/2 | 0/2 | 0.500 | 0.300 | 0.015 | 0.035 | 0.030 | 0.070 "
        "| 0.485 | 0.465 |",
        "| 8 | 0.002 | — | 2/2 | — | — | 0/2 | — | 0.100 | — | 0.035 | — | 0.070 | — | 0.465 |",
        "| 16 | 0.002 | 1/2 | — | — | 0/2 | — | 0.300 | — | 0.015 | — | 0.030 | — | 0.485 | — |",
        "| 1 | 0.004 | 0/1 | — | — | 0/1 | — | 0.500 | — | 0.010 | — | 0.020 | — | 0.490 | — |",
    ])
    assert expected in text, text
    # Columns follow the axes: objective, optim.lr, μ.
    assert "| CFPO | 0.001 | 8 | 2 | 0.700 ± 0.283 | 0.700 ± 0.283 | none | 1/2: 4 (reward) |" in text
    assert "| cfpo_lr0.001_mu8_seed0 | CFPO | 0.001 | 8 | 0 | 6 | 0.900 | 0.900 | none | 4 (reward) |" in text
    assert "![map](map.png)" in text
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_last_round_study_file_still_runs_from_the_command_line(tmp_path):
    """The last round's stability_quickstart.py format (objectives / num_epochs at the top) through
    `python -m cfpo_jax.study --plot-only` on runs of that round's names."""
    study_file = tmp_path / "old_study.py"
    study_file.write_text(
        "import ml_collections\n"
        "def get_config(arg=''):\n"
        "    s = ml_collections.ConfigDict()\n"
        "    s.name = 'old'\n"
        f"    s.output_dir = {str(tmp_path / 'out')!r}\n"
        "    s.objectives = ('cfpo', 'ppo')\n"
        "    s.num_epochs = (1, 8, 16)\n"
        "    s.num_minibatches = (1,)\n"
        "    s.seeds = (0, 1, 2)\n"
        "    s.overrides = ml_collections.ConfigDict()\n"
        "    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=2, entropy_floor=0.05))\n"
        "    s.late_fraction = 0.25\n"
        "    s.eval_metric = 'eval/arithmetic/greedy'\n"
        "    return s\n")
    _write_curve(tmp_path / "out" / "runs" / "ppo_mu8_mb1_seed1", [0.2, 0.4, 0.6, 0.8],
                 {"entropy": 1.0})
    result = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.study", "--config=configs/quickstart.py",
         f"--study={study_file}", "--study.num_epochs=(8,)", "--plot-only"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "out" / "report.md").read_text()
    assert "6 runs, 1 finished" in text
    assert "| GRPO | 8 | 1 | 1 | 0.700 | 0.700 | — | none | none |" in text, text


@pytest.mark.parametrize("name, shared", [
    ("stability_eps_quickstart", {"rl.eps": 0.2}),
    ("stability_batch_ratio_quickstart", {"rl.num_minibatches": 1}),
])
def test_an_ablation_study_shares_its_default_cells_with_the_map(name, shared):
    """The ablations' runs at the base config's value of their new axis (ε = 0.2, one minibatch)
    train exactly the stability map's config with the same seed, so the map's finished runs stand
    in for them (docs/studies/README.md); the other runs differ from the map's only in that axis."""
    ablation_spec, map_spec = load_study_file(name), load_study_file("stability_map_quickstart")
    map_spec.seeds = ablation_spec.seeds  # the map's frontier cells have 5 seeds (its report)
    ablation, stability_map = (study_lib.Study(spec=s, base=quickstart(), base_file="configs/quickstart.py")
                               for s in (ablation_spec, map_spec))
    map_configs = {(r.value("rl.objective"), r.value("optim.lr"), r.value("rl.num_epochs"), r.seed):
                   stability_map.config(r).to_dict() for r in stability_map.runs()}
    [(path, value)] = shared.items()
    matched = 0
    for run in ablation.runs():
        config = ablation.config(run)
        key = (run.value("rl.objective"), run.value("optim.lr"), run.value("rl.num_epochs"), run.seed)
        section, field = path.split(".")
        assert map_configs[key][section][field] == value
        with config.unlocked():
            config[section][field] = value
        assert config.to_dict() == map_configs[key], run.name
        matched += run.value(path) == value
    assert matched == len(ablation.runs()) // len(ablation.axis(path).values)


# ----------------------------------------------------------------------------- end to end


def _study_command(output_dir):
    return [sys.executable, "-m", "cfpo_jax.study", "--config=configs/quickstart.py",
            "--study=configs/studies/stability_map_quickstart.py", f"--study.output_dir={output_dir}",
            "--study.axes.rl.num_epochs=(1, 4)", "--study.axes.optim.lr=(0.0007,)",
            "--study.seeds=(0,)", "--parallel=2",
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
        ["| CFPO", "0.0007", "1"], ["| GRPO", "0.0007", "1"], ["| CFPO", "0.0007", "4"],
        ["| GRPO", "0.0007", "4"]]
    # The reduced map: 1 seed per cell (6 steps from a random model: collapse or not, it says so).
    assert "- frontier of CFPO: optim.lr 0.0007 → " in report
    assert re.search(r"\| 4 \| 0.0007 \| [01]/1 \| [01]/1 \| [01].000 \| [01]/1 \| [01]/1 \|", report)
    assert all((out / f"{n}.png").exists()
               for n in ("map", "reward", "entropy", "ratio_dev", "clip_frac"))
