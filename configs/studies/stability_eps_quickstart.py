r"""The ε ablation at the stability map's frontier cell: CFPO vs GRPO at ε ∈ {0.1, 0.2, 0.4} (issue 24).

Launch (resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_eps_quickstart.py --parallel=2

Run time: 2 objectives × 3 ε × 5 seeds = 30 runs of 100 RL steps (16 prompts × 8 samples) at
μ = 4, lr 1e-3, after the quickstart's 150-step warm start, each with its final 200-problem greedy
evaluation — the stability map's runs (configs/studies/stability_map_quickstart.py) with ε as
the axis. Measured 2026-12-03 on the otherwise idle 2-core box with --parallel=2 under
`nice -n 19`: 79–109 s per run, the 20 runs at ε ∈ {0.1, 0.4} in 16 min; all 30 take about
25 min. The 10 ε = 0.2 runs are the map's own (the same config), linked in from the map's
output (docs/studies/README.md).

What it asks: the paper fixes ε = 0.2 and never ablates it. ε means different things to the two
objectives — GRPO's clip range (a wider range moves the ratio further before the gradient stops)
and CFPO's penalty |A|/(2ε)·(r−1)² (a larger ε a weaker restoring force) — so at the map's frontier
cell (lr 1e-3, μ = 4: CFPO collapsed in 4 of 5 seeds, GRPO in none) the question is whether a
smaller ε moves CFPO's frontier and a larger one GRPO's. The map's x axis is ε: its "frontier" is
the largest ε with no collapsed seed at it or any smaller ε.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "stability_eps_quickstart"
    s.output_dir = "runs/studies/stability_eps_quickstart"
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        eps=(0.1, 0.2, 0.4),
        num_epochs=(4,),  # one value: the map's frontier cell, named in the runs like the map's
    ))
    s.axes.optim = ml_collections.ConfigDict(dict(lr=(1e-3,)))
    s.seeds = (0, 1, 2, 3, 4)
    s.map = ml_collections.ConfigDict(dict(x="rl.eps", y="optim.lr"))

    # The stability map's settings (configs/studies/stability_map_quickstart.py), unchanged.
    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=100, checkpoint_every=25, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
