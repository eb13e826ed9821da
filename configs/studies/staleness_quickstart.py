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

Run time: 5 × 2 × 2 × 5 = 100 runs; measured 2026-12-07 on the 2-core box: 79–151 s a run at
--parallel=2 when the study had the box (the last 44 runs in 36 minutes), up to 2,567 s beside
other work — about 1.5 hours when nothing else runs. Results: docs/studies/staleness_quickstart.
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
