r"""The staleness study on the quickstart task: CFPO vs GRPO when the rollouts come from an older
policy (issue 32, point 7) — the question no peer has measured.

Launch (resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/staleness_quickstart.py --parallel=2

Axes: `rl.max_staleness` k ∈ {0, 1, 2, 4, 8} (the rollout of step t sampled by the policy of
step t - k, `rollout.Lagged`) × {CFPO, GRPO} × the ratio's reference, two ways (linked axes):
  * `recomputed` + `tis`: r = π/π_old with π_old the learner's logprobs at the start of the step
    (AReaL's proximal policy), each token weighted by min(π_old/π_sampler, 2) (truncated IS);
  * `behaviour` + `none`: r = π/π_sampler, the sampler's own logprobs — a stale token is off
    policy before the first gradient step, where clipping zeroes its gradient and CFPO's penalty
    stays smooth;
at the stability map's frontier cell (lr 1e-3, μ = 4: docs/studies/stability_map_quickstart),
5 seeds, 100 RL steps of 16 prompts × 8, with the map's collapse rule. The second learning rate
the issue asks for where time allows: `--study.axes.optim.lr='(7e-4,)'`.

Run time: 5 × 2 × 2 × 5 = 100 runs of about 100 s each on the idle 2-core box (the map's μ = 4
runs: 79–109 s; the composition study's first two, 2026-12-06: 97 and 99 s at --parallel=2) —
about 1.5 hours at --parallel=2 when nothing else runs (computed from those times, not measured).
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "staleness_quickstart"
    s.output_dir = "runs/studies/staleness_quickstart"
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        max_staleness=(0, 1, 2, 4, 8),
        ratio_reference=("recomputed", "behaviour"),
        rollout_correction=("tis", "none"),
    ))
    s.linked = (("rl.ratio_reference", "rl.rollout_correction"),)
    s.axes.optim = ml_collections.ConfigDict(dict(lr=(1e-3,)))
    s.seeds = (0, 1, 2, 3, 4)
    s.map = ml_collections.ConfigDict(dict(x="rl.max_staleness", y="optim.lr"))

    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=100, checkpoint_every=25, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))
    s.overrides.rl = ml_collections.ConfigDict(dict(num_epochs=4))  # the frontier cell's μ

    # The stability map's collapse rule (cfpo_jax.stability.outcome).
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
