r"""The default stability study: CFPO vs GRPO on the quickstart task at μ ∈ {1, 8, 16}, 3 seeds.

Launch:
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_quickstart.py --parallel=2

Run time: 18 training runs of 60 RL steps (16 prompts × 8 samples per step), each with the
quickstart's warm start, compilation and final 200-problem greedy evaluation. Measured
2026-11-23 on the 2-core box: 32 min 27 s with --parallel=2 for all 18 runs, while a SmolLM2
training run shared the box for the first 19 minutes; on the box nearly to itself (seed 2) a run
took 67–76 s at μ = 1, 86 s at μ = 8 and 135 s at μ = 16 (docs/studies/README.md).

What it asks (arXiv 2601.22801, Fig. 2 in miniature): with μ epochs over each rollout batch the
update goes off-policy; GRPO's clipped surrogate has a zero-gradient wall there, CFPO a restoring
force. At μ = 1 the two objectives make the same updates (the tests check it), so that column is
the control. The report is `runs/studies/stability_quickstart/report.md`; the committed copy with
its plots is docs/studies/stability_quickstart/.

Why these settings: μ = 16 costs 16 optimiser updates per RL step, so the whole study is
(1 + 8 + 16) × 2 × 3 = 150 updates per step of the schedule; 60 steps at half the quickstart's
batch is what fits the time limit on 2 CPU cores (most of the off-policy dynamics at μ ≥ 8 happen
in the first few dozen steps). The quickstart's learning rate
and cosine schedule (over num_steps × μ updates) are kept.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "stability_quickstart"
    s.output_dir = "runs/studies/stability_quickstart"
    # Each axis is a training-config field with its values (cfpo_jax.study.axes_of).
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        num_epochs=(1, 8, 16),  # μ, the paper's "iterations"
        num_minibatches=(1,),  # the paper's "batch ratio"
    ))
    s.seeds = (0, 1, 2)

    # Applied to every run, over the base config (command-line --config.* overrides go over these).
    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=60, checkpoint_every=20, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))

    # cfpo_jax.stability.outcome: a run is down where its `window`-step mean reward is more than
    # `delta` below its best so far or its `window`-step mean entropy is below `entropy_floor`;
    # down to the end (or a non-finite update) is a collapse, down and back is a dip.
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=5, entropy_floor=0.05))
    s.late_fraction = 0.25  # late-run means over the last quarter of the steps
    s.eval_metric = "eval/arithmetic/greedy"  # the quickstart's held-out greedy accuracy at the end
    return s
