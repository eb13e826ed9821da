r"""Does CFPO compose with the other RLVR tricks? CFPO vs GRPO × dynamic sampling × Clip-Cov at the
stability map's frontier cell (issue 34, point 5).

Launch (resumable — run the same command again):
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/composition_quickstart.py --parallel=2

Run time: 2 objectives × dynamic sampling off/on × Clip-Cov off/on × 5 seeds = 40 runs of 100 RL
steps (16 prompts × 8 samples) at μ = 4, lr 1e-3, after the quickstart's 150-step warm start —
the stability map's settings (configs/studies/stability_map_quickstart.py), so the 10 runs with
both tricks off are the map's own frontier runs. A run with dynamic sampling samples up to 4
rounds per step (1.9–2.0 on average in the first pass below). Measured 2026-12-06 with
--parallel=2 under `nice -n 19` on the 2-core box shared with five other sessions (load average
15–29): 1,247–1,300 s per run with dynamic sampling, against the map's 79–109 s per run on the
idle box; the 30 runs not in the map would take hours there.

First pass (2026-12-06): seed 0 only, the six cells with a trick, through
  python -m cfpo_jax.study --config=configs/quickstart.py --study=configs/studies/composition_quickstart.py \
    --parallel=2 --study.seeds='(0,)' --study.axes.rl.dynamic_sampling='(True,)'
and the same with --study.axes.rl.dynamic_sampling='(False,)' --study.axes.rl.entropy_control="('clip_cov',)"
(one seed: an anecdote, not the study; the 5-seed study and its report are still to run).
Final reward (last 10 steps) / greedy accuracy on the 200 held-out problems / wall time:
  CFPO + dynamic sampling             0.513 / 0.685 / 1,261 s   no collapse
  CFPO + dynamic sampling + Clip-Cov  0.562 / 0.860 / 1,247 s   no collapse
  CFPO + Clip-Cov                     0.548 / 0.735 /   690 s   no collapse
  GRPO + dynamic sampling             0.645 / 0.875 / 1,300 s   no collapse
  GRPO + dynamic sampling + Clip-Cov  0.639 / 0.870 / 1,293 s   no collapse
  GRPO + Clip-Cov                     0.616 / 0.920 /   695 s   no collapse
  CFPO without either (rerun today)   0.515 / 0.830 /   273 s   no collapse
  the map's seed 0 without either     CFPO 0.250 (collapsed at step 3), GRPO 0.648
The map's seed-0 CFPO collapse did not reproduce with today's code (the trainer split into parts,
typed keys: other random draws), so this seed shows no effect of either trick on CFPO — its
held-out accuracy was 0.69–0.86 with them and 0.83 without. Only the 5-seed study can say more.
(The two CFPO runs logged `reward_mean` over the trained groups only — a version before it became
the mean over every sampled row; the GRPO runs show the two within 0.03 of each other.) Every
trained batch had zero_std_groups = 0, none needed filling, and Clip-Cov stopped the gradient of
1.8–1.9% of the tokens.

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
