r"""The full stability grid on the quickstart task, for a bigger machine: the paper's sweep.

Launch (runs are independent processes; give each a core or two):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_quickstart_full.py --parallel=8

Run time: 2 objectives × μ ∈ {1, 2, 4, 8, 16} × batch ratio ∈ {1, 4} × 5 seeds = 100 runs of the
full quickstart (300 steps, 32 prompts × 8 samples), i.e. 2 × 31 × 2 × 5 = 620 × 300 optimiser
updates of 64–256 sequences; not yet measured (no such machine this session). The 2-core subset
is configs/studies/stability_quickstart.py, whose report is in docs/studies/.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "stability_quickstart_full"
    s.output_dir = "runs/studies/stability_quickstart_full"
    # Each axis is a training-config field with its values (cfpo_jax.study.axes_of).
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        num_epochs=(1, 2, 4, 8, 16),  # μ, the paper's "iterations"
        num_minibatches=(1, 4),  # the paper's "batch ratio"
    ))
    s.seeds = (0, 1, 2, 3, 4)

    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        checkpoint_every=50, keep_checkpoints=1, export_hf=False, tensorboard=False))

    # See cfpo_jax.stability.outcome.
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
