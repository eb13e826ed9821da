r"""The batch-ratio axis at the stability map's frontier row: CFPO vs GRPO, 1 or 4 minibatches × μ ∈ {1, 4, 8} (issue 24).

Launch (resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_batch_ratio_quickstart.py --parallel=2

Run time: 2 objectives × μ ∈ {1, 4, 8} × {1, 4} minibatches × 5 seeds = 60 runs of 100 RL steps
(16 prompts × 8 samples) at lr 1e-3 after the quickstart's 150-step warm start, each with its
final 200-problem greedy evaluation. Four minibatches make four optimiser updates per epoch on a
quarter of the batch each (the same tokens, μ × 4 updates per step). Measured 2026-12-03 on
the otherwise idle 2-core box with --parallel=2 under `nice -n 19`: 52–67 s per run at μ = 1,
67–77 s at μ = 4 (four minibatches), 82–92 s at μ = 8 (four minibatches) and 79–109 s at μ = 4
(one, the ε study's); 36 runs took 21 min, so all 60 take about 40 min. The one-minibatch runs
at μ ∈ {4, 8} and two seeds at μ = 1 are the map's own (the same config), linked in from the
map's output (docs/studies/README.md).

What it asks: the paper's second source of off-policy pressure is the "batch ratio" — splitting
a rollout batch into several minibatches, so every update after the first trains on samples of
an older policy, as μ > 1 does. At the map's frontier row (lr 1e-3: CFPO collapsed at μ = 4 in 4
of 5 seeds, GRPO in none) the question is whether four minibatches move either frontier the
way more epochs do, and whether the two sources add up (μ × minibatches updates per step).
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "stability_batch_ratio_quickstart"
    s.output_dir = "runs/studies/stability_batch_ratio_quickstart"
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        num_epochs=(1, 4, 8),  # μ, the paper's "iterations"
        num_minibatches=(1, 4),  # the paper's "batch ratio"
    ))
    s.axes.optim = ml_collections.ConfigDict(dict(lr=(1e-3,)))  # the map's frontier row
    s.seeds = (0, 1, 2, 3, 4)
    s.map = ml_collections.ConfigDict(dict(x="rl.num_epochs", y="rl.num_minibatches"))

    # The stability map's settings (configs/studies/stability_map_quickstart.py), unchanged.
    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=100, checkpoint_every=25, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
