"""Metrics: one RL step's metrics computed in one place, and where they go — `<workdir>/metrics.jsonl`
(always), TensorBoard, optional W&B, console progress.

`step_metrics` gathers a step's metrics on the host with one fetch of the device scalars: the
rollout's host metrics (rewards, lengths, `verbosity_metrics`), the rollout's device metrics and
the mean over the step's updates (`mean_metrics`).

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

from cfpo_jax import sharding


def _scalar(value):
    value = np.asarray(value)
    if value.size != 1:
        return None
    value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return value


def mean_metrics(metrics_list: list[dict]) -> dict[str, float]:
    """The mean over a step's updates of each metric; the max / min of ratio_max,
    rollout_is_weight_max / ratio_min."""
    out = {}
    for key in metrics_list[0]:
        values = np.array([m[key] for m in metrics_list], np.float64)
        out[key] = values.max() if key in ("ratio_max", "rollout_is_weight_max") \
            else values.min() if key == "ratio_min" else values.mean()
    return {k: float(v) for k, v in out.items()}


def verbosity_metrics(reward_B, lengths_B, group_size: int) -> dict[str, float]:
    """Length diagnostics of one rollout (the paper's verbosity exploitation: responses that grow
    with the reward). `reward_B` is the reward functions' total, before any KL penalty.

    response_len_p90: 90th percentile of response lengths (tokens, linear interpolation).
    reward_len_corr: Pearson correlation of reward and length within groups: both centred on
      their group's mean, then pooled over the batch, so that prompts with longer answers and
      higher rewards do not make a correlation of their own; 0 when either has no spread.
    reward_per_token: Σ reward / Σ length over the batch.
    """
    reward_NxG = np.asarray(reward_B, np.float64).reshape(-1, group_size)
    length_NxG = np.asarray(lengths_B, np.float64).reshape(-1, group_size)
    reward_dev = reward_NxG - reward_NxG.mean(axis=1, keepdims=True)
    length_dev = length_NxG - length_NxG.mean(axis=1, keepdims=True)
    scale = np.sqrt(np.sum(reward_dev**2) * np.sum(length_dev**2))
    return dict(
        response_len_p90=float(np.percentile(length_NxG, 90)),
        reward_len_corr=float(np.sum(reward_dev * length_dev) / scale) if scale > 0 else 0.0,
        reward_per_token=float(np.sum(reward_NxG) / max(np.sum(length_NxG), 1.0)),
    )


def rollout_metrics(scores, lengths_B, group_size: int, sample_seconds: float) -> dict:
    """The host metrics of one scored rollout (`scores`: `rewards.Scores`; `lengths_B` host)."""
    groups = scores.total_B.reshape(-1, group_size)
    return dict(
        **scores.metrics("reward"),
        response_len_mean=float(lengths_B.mean()),
        response_len_max=int(lengths_B.max()),
        **verbosity_metrics(scores.total_B, lengths_B, group_size),
        zero_std_groups=int((np.ptp(groups, axis=1) == 0).sum()),
        tokens_per_s=float(lengths_B.sum()) / max(sample_seconds, 1e-9),
    )


def step_metrics(host_metrics, device_metrics, update_metrics, state) -> dict:
    """All of one step's metrics on the host: one fetch of the device scalars (on every process,
    also one that holds none of the learner's devices: `sharding.fetch`)."""
    device_metrics, update_metrics, skipped = sharding.fetch(
        (device_metrics, update_metrics, state["skipped_updates"]))
    return dict(**host_metrics, **mean_metrics(update_metrics),
                **{k: float(v) for k, v in device_metrics.items()}, skipped_updates=int(skipped))


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
