r"""The lead the stability map left (issue 32, point 7): at its frontier cell (lr 1e-3, μ = 4) CFPO
collapsed in 4 of 5 seeds and GRPO in none, and CFPO's pre-clip gradient norm was the larger.
Does global-norm clipping (`optim.max_grad_norm = 1`, the quickstart's) explain the collapses —
what happens with it off?

Launch (resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/grad_clip_frontier_quickstart.py --parallel=2

One cell, clipping off, CFPO vs GRPO, 5 seeds, 100 RL steps of 16 prompts × 8 — the map's settings
and collapse rule. Its counterpart with clipping on is the composition study's cell without either
trick (configs/studies/composition_quickstart.py: the same settings and seeds, run with today's
code), so the two are read side by side in docs/studies/grad_clip_frontier_quickstart.md.

Run time: 10 runs, 95–96 s each at --parallel=2 on the quiet 2-core box (2026-12-07).

Result (docs/studies/grad_clip_frontier_quickstart/, docs/studies/README.md): without clipping
CFPO collapsed in 3 of 5 seeds (2 of 5 with it), final reward 0.33 (0.41 with it); GRPO 0 of 5,
0.76 (0.75). Clipping does not explain CFPO's collapses.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "grad_clip_frontier_quickstart"
    s.output_dir = "runs/studies/grad_clip_frontier_quickstart"
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        num_epochs=(4,),  # one value: the map's frontier cell, named in the runs like the map's
    ))
    s.axes.optim = ml_collections.ConfigDict(dict(lr=(1e-3,), max_grad_norm=(0.0,)))
    s.seeds = (0, 1, 2, 3, 4)

    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=100, checkpoint_every=25, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))

    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
