"""The DAPO recipe's parts outside the trainer: the DAPO-Math-17k preset (on a row in its verl
format written here) and the composition study's cells against the stability map's."""

import json

from cfpo_jax import data
from tests.fixtures.runs import quickstart, quickstart_study


DAPO_ROW = {
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": (
        "Solve the following math problem step by step. The last line of your response should "
        "be of the form Answer: $Answer (without quotes) where $Answer is the answer to the "
        "problem.\n\nWhat is $2+3$?\n\nRemember to put your answer on its own line after "
        "\"Answer:\".")}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "5", "style": "rule-lean"},
    "extra_info": {"index": "a1"},
}


def test_dapo_math_preset_keeps_the_problem_and_the_ground_truth(tmp_path):
    path = tmp_path / "DAPO-Math-17k.jsonl"
    path.write_text(json.dumps(DAPO_ROW) + "\n" + json.dumps({"prompt": [], "reward_model": {}}))
    assert data.preset_for("hf:BytedTsinghua-SIA/DAPO-Math-17k:train") == "dapo_math"
    ds = data.load(f"jsonl:{path}", preset="dapo_math")
    row = ds[0]
    assert (row["question"], row["answer"]) == ("What is $2+3$?", "5")
    assert row["data_source"] == "math_dapo"  # the other fields reach reward functions
    try:
        ds[1]
    except ValueError as e:
        assert "row 1: field 'prompt' has no user turn" in str(e)
    else:
        raise AssertionError("a row without a user turn must fail")


def test_composition_study_without_the_tricks_is_the_maps_frontier_cell():
    """Its runs with dynamic sampling and Clip-Cov off train the stability map's config at
    (lr 1e-3, μ = 4) with the same seed (the tricks' own knobs are inert when they are off)."""
    composition = quickstart_study("composition_quickstart")
    stability_map = quickstart_study("stability_map_quickstart")
    stability_map.spec.seeds = composition.spec.seeds
    map_configs = {(r.value("rl.objective"), r.value("optim.lr"), r.value("rl.num_epochs"), r.seed):
                   stability_map.config(r).to_dict() for r in stability_map.runs()}
    base_rl = quickstart().rl
    plain = 0
    for run in composition.runs():
        config = composition.config(run).to_dict()
        assert config["rl"]["num_epochs"] == 4 and config["optim"]["lr"] == 1e-3
        if run.value("rl.dynamic_sampling") or run.value("rl.entropy_control") != "none":
            continue
        for knob in ("dynamic_sampling_max_rounds", "clip_cov_ratio"):
            config["rl"][knob] = base_rl[knob]
        key = (run.value("rl.objective"), 1e-3, 4, run.seed)
        assert config == map_configs[key], run.name
        plain += 1
    assert plain == 10 and len(composition.runs()) == 40
