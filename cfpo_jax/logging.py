"""Metrics writers: `<workdir>/metrics.jsonl` (always), TensorBoard, optional W&B, console progress.

`MetricsWriter.write(step, metrics)` appends one JSON object per call (one per RL step, and one per
evaluation with an `eval/` prefix on its keys) and forwards scalars to TensorBoard (tensorboardX,
no TensorFlow) and, when a project is named, Weights & Biases. Only process 0 writes.

The console gets one line per `log_every` steps with reward and step time; on a terminal the line
is redrawn in place as a progress bar, otherwise (CI, `nohup`, pipes) it is a plain line so logs
stay readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def _scalar(value):
    value = np.asarray(value)
    if value.size != 1:
        return None
    value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


class MetricsWriter:
    """Appends metrics to JSONL and TensorBoard (and W&B when `wandb_project` is set)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_project: str = "",
                 config: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        # Appending (not truncating) keeps the history of a resumed run in one file.
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    f"train.wandb_project={wandb_project!r} needs wandb: pip install 'cfpo_jax[wandb]'"
                ) from e
            self._wandb = wandb.init(project=wandb_project, config=config, dir=workdir,
                                     resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for key, value in metrics.items():
            value = _scalar(value)
            if value is None:
                continue
            # JSON has no NaN/inf; write them as strings so a bad step is still visible.
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            record[key] = value
        self._jsonl.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """Console progress: a redrawn bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, *, every: int = 1, stream=None,
                 enabled: bool = True):
        self.total, self.every, self.enabled = total, every, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        # The ETA is timed from the first reported step on, so compilation does not inflate it.
        self._first = None

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        if self._first is None:
            self._first = (time.time(), step)
        first_time, first_step = self._first
        eta = ((time.time() - first_time) / (step - first_step) * (self.total - step)
               if step > first_step else float("nan"))
        text = (
            f"step {step}/{self.total}  reward {metrics.get('reward_mean', float('nan')):.3f}  "
            f"step {metrics.get('time_step_s', float('nan')):.2f}s  "
            f"len {metrics.get('response_len_mean', float('nan')):.1f}  "
            f"clip_frac {metrics.get('clip_frac', float('nan')):.3f}  "
            + (f"eta {eta:.0f}s" if math.isfinite(eta) else "eta ?")
        )
        if self.tty:
            width = 20
            filled = int(width * step / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar (evaluation results, checkpoints)."""
        if not self.enabled:
            return
        prefix = "\r\x1b[K" if self.tty else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()
