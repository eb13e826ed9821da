r"""Does CFPO compose with the other RLVR tricks? CFPO vs GRPO × dynamic sampling × Clip-Cov at the
stability map's frontier cell (issue 34, point 5).

Launch (resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/composition_quickstart.py --parallel=2

Run time: 2 objectives × dynamic sampling off/on × Clip-Cov off/on × 5 seeds = 40 runs of 100 RL
steps (16 prompts × 8 samples) at μ = 4, lr 1e-3, after the quickstart's 150-step warm start —
the stability map's settings (configs/studies/stability_map_quickstart.py), so the 10 runs with
both tricks off are the map's own frontier config. A run with dynamic sampling samples up to 4
rounds per step. Measured 2026-12-06/07 with --parallel=2 on the 2-core box: 97–99 s per run while
it was quiet, 270–590 s while four other sessions shared it; the whole study 7,230 s.

Result (docs/studies/composition_quickstart/, docs/studies/README.md), collapsed seeds of 5 and the
final reward, CFPO / GRPO:
  neither trick             2/5, 0.41   /  0/5, 0.75
  dynamic sampling          0/5, 0.62   /  0/5, 0.82
  Clip-Cov                  3/5, 0.42   /  0/5, 0.78
  both                      1/5, 0.52   /  0/5, 0.79
Dynamic sampling helps CFPO (1/10 collapsed with it, 5/10 without: Fisher p = 0.14); Clip-Cov
does not; GRPO stays the more stable objective (0/20 against 6/20, p = 0.020).

What it asks: at lr 1e-3, μ = 4, CFPO collapsed in 4 of 5 seeds and GRPO in none
(docs/studies/stability_map_quickstart). Dynamic sampling keeps every trained group informative
(no zero-advantage groups diluting the token-mean), which makes each update larger as the reward
rises; Clip-Cov stops the gradient of the few tokens whose covariance of logprob and advantage
drives the entropy down. Either may move CFPO's collapse; neither has been tried with CFPO.

Clip-Cov's share of tokens: the paper's 2e-4 is for batches of ~10^6 tokens; the quickstart's
minibatch has ~400, where that share rounds to its floor of one token per update. 2e-2 (about 8
tokens) is used here, with the paper's band 1 < cov < 5.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "composition_quickstart"
    s.output_dir = "runs/studies/composition_quickstart"
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        dynamic_sampling=(False, True),
        entropy_control=("none", "clip_cov"),
        num_epochs=(4,),  # one value: the map's frontier cell, named in the runs like the map's
    ))
    s.axes.optim = ml_collections.ConfigDict(dict(lr=(1e-3,)))
    s.seeds = (0, 1, 2, 3, 4)
    # A map per objective over the two tricks, with Fisher's test of CFPO against GRPO per cell.
    s.map = ml_collections.ConfigDict(dict(x="rl.dynamic_sampling", y="rl.entropy_control"))

    # The stability map's settings, unchanged, and the tricks' own knobs.
    s.overrides = ml_collections.ConfigDict()
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=100, checkpoint_every=25, keep_checkpoints=1, export_hf=False, tensorboard=False))
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=16))
    s.overrides.rl = ml_collections.ConfigDict(dict(dynamic_sampling_max_rounds=4,
                                                    clip_cov_ratio=0.02))

    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
