r"""The stability map on the quickstart task: CFPO vs GRPO over μ × learning rate (issue 24).

Launch (the coarse pass: 2 seeds of every cell; resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_map_quickstart.py --parallel=2

Then ≥ 5 seeds on and next to the frontier: the same output_dir, the frontier cells as the axes
(finished runs are reused by name), e.g.
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_map_quickstart.py --parallel=2 \
    --study.seeds='(0, 1, 2, 3, 4)' --study.axes.rl.num_epochs='(8, 16)' --study.axes.optim.lr='(0.0015,)'
That run's report covers its own cells; the whole map with every seed on disk is
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/stability_map_quickstart.py \
    --study.seeds='(0, 1, 2, 3, 4)' --plot-only
(its "planned" count then includes the seeds only the frontier cells were meant to get).

Run time: 2 objectives × μ ∈ {1, 4, 8, 16, 32} × lr ∈ {7e-4, 1e-3, 1.5e-3, 3e-3} × 2 seeds = 80 runs of
100 RL steps (16 prompts × 8 samples) after the quickstart's 150-step warm start, each with its
final 200-problem greedy evaluation. Measured 2026-12-03 with --parallel=2 under `nice -n 19` on the
2-core box shared with five other sessions' tests (load average 8–17): 141–144 s per run at
μ = 1 while the box was quiet; under the load 300–456 s at μ = 1, 428–550 s at μ = 4 and
624–647 s at μ = 8 (docs/studies/README.md). The 2026-11-23 study took 67–76 s (μ = 1) to 135 s (μ = 16) per 60-step run on the idle box; on
the idle box on 2026-12-03 (third session) a 100-step run took 165–333 s at μ = 16–32, so the 80
coarse runs would take about 2–3 hours there (computed from those times, not measured).
Measured on the idle box on 2026-12-03 (fourth session): 23 runs at μ ∈ {16, 32} in 2,782 s,
160–351 s per run. The map of docs/studies/stability_map_quickstart (138 runs) was run in parts
over four sessions: the study resumes where it stopped.

What it asks: the paper's claim is a frontier — GRPO collapses at μ = 8, CFPO holds to 16+ — and
frontiers move with step size. 7e-4 is the quickstart's learning rate (no collapse at μ ≤ 16 in
docs/studies/stability_quickstart); 1.5e-3 undid the warm start within ten steps once (the
quickstart's comment) and 3e-3 is past it, so the map should span stable to unstable. μ = 1 is
the control: there CFPO and GRPO make identical updates. The schedule is the quickstart's cosine
over num_steps × μ updates.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "stability_map_quickstart"
    s.output_dir = "runs/studies/stability_map_quickstart"
    # Each axis is a training-config field with its values (cfpo_jax.study.axes_of).
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        num_epochs=(1, 4, 8, 16, 32),  # μ, the paper's "iterations"
    ))
    # 1e-3 added after the first runs: at 1.5e-3 the reward fell 0.38 → ~0.1 even at μ = 1, where
    # both objectives make the same updates — the step size alone undoes the warm start there.
    s.axes.optim = ml_collections.ConfigDict(dict(lr=(7e-4, 1e-3, 1.5e-3, 3e-3)))
    s.seeds = (0, 1)
    s.map = ml_collections.ConfigDict(dict(x="rl.num_epochs", y="optim.lr"))

    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=100, checkpoint_every=25, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))

    # cfpo_jax.stability.outcome: down = the 10-step mean reward more than 0.15 below its best so
    # far, or the 10-step mean entropy under 0.05; down to the end is a collapse, down and back a dip.
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
