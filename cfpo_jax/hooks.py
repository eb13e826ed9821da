"""What runs around the RL steps without being one: evaluation and export, as hooks.

A hook has three moments: `on_start(run)` before the first step of this invocation,
`on_step_end(run)` after each step (its metrics written, its checkpoint taken) and `on_end(run)`
once the loop has stopped (checkpoints closed). `run` is the loop's `RunView`: the step, the
policy as it is now, whether the run finished or was stopped, and the writer and console. A new
capability that watches or uses the policy between steps (periodic exports, a custom
evaluation, pushing weights to a server) is a hook, not more loop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from cfpo_jax import evaluate, lora, models, metrics


@dataclasses.dataclass
class RunView:
    """What a hook may read of the run. `policy()` merges the current parameters into a model
    (the adapters on their base with LoRA)."""

    step: int
    num_steps: int
    policy: Callable[[], object]
    writer: metrics.MetricsWriter
    progress: metrics.Progress
    stopped_by: str | None = None

    @property
    def finished(self) -> bool:
        """The run reached num_steps and was not stopped."""
        return self.step == self.num_steps and self.stopped_by is None


class Hook:
    """The three moments, each doing nothing unless overridden."""

    def on_start(self, run: RunView) -> None:
        pass

    def on_step_end(self, run: RunView) -> None:
        pass

    def on_end(self, run: RunView) -> None:
        pass


class Evaluate(Hook):
    """`config.eval`: evaluate the policy at step 0 (`eval.at_start`), every `eval.every_steps`
    and at the last step; results go to the metrics with an `eval/` prefix."""

    def __init__(self, config, workdir: str, tokenizer, mesh, eos_ids):
        self.config, self.tokenizer, self.mesh, self.eos_ids = config, tokenizer, mesh, eos_ids
        self.output_dir = config.eval.output_dir or os.path.join(workdir, "eval")

    def _evaluate(self, run: RunView):
        results = evaluate.evaluate_model(
            run.policy(), self.tokenizer, self.config, output_dir=self.output_dir, step=run.step,
            mesh=self.mesh, eos_token_ids=self.eos_ids, progress=run.progress.tty)
        run.writer.write(run.step, {f"eval/{k}": v for k, v in results.items()})
        shown = (f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items())
        run.progress.message(f"eval @ {run.step}: " + "  ".join(shown))

    def on_start(self, run: RunView):
        if self.config.eval.at_start and run.step == 0:
            self._evaluate(run)

    def on_step_end(self, run: RunView):
        every = self.config.eval.every_steps
        if (every and run.step % every == 0) or run.step == run.num_steps:
            self._evaluate(run)


class Export(Hook):
    """`train.export_hf` / `train.export_peft`: the finished policy as a Hugging Face directory
    (<workdir>/hf, adapters merged) and the adapters as PEFT LoRA (<workdir>/peft)."""

    def __init__(self, config, workdir: str, tokenizer, base_model_path: str):
        self.config, self.workdir = config, workdir
        self.tokenizer, self.base_model_path = tokenizer, base_model_path

    def on_end(self, run: RunView):
        if not run.finished:
            return
        if self.config.train.export_hf:
            path = os.path.join(self.workdir, "hf")
            policy = run.policy()
            models.save_pretrained(lora.merge(policy) if self.config.lora.rank else policy, path,
                                   tokenizer=self.tokenizer)
            run.progress.message(f"exported the policy to {path}")
        if self.config.train.export_peft:
            path = os.path.join(self.workdir, "peft")
            lora.save_peft(run.policy(), path, base_model_path=self.base_model_path)
            run.progress.message(f"exported the adapters (PEFT) to {path}")


def from_config(config, workdir: str, policy, mesh) -> list[Hook]:
    """The hooks `config` asks for (`policy`: the run's `policy.Policy`)."""
    hooks: list[Hook] = []
    if config.eval.sources:
        hooks.append(Evaluate(config, workdir, policy.tokenizer, mesh, policy.eos_ids))
    if config.train.export_hf or config.train.export_peft:
        hooks.append(Export(config, workdir, policy.tokenizer, policy.model_path))
    return hooks
