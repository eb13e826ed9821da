"""The fixed-lag producer (`cfpo_jax.async_rollout`) with a fake sampler and learner: the rollout
of step t comes from version max(t - k, 0) whatever the timing; k = 0's producer equals the
synchronous loop; pending + restore resumes exactly; failures surface with their traceback. The
same holds without a thread (`threaded=False`, several processes: generated in line by `publish`)."""

import random
import threading
import time

import numpy as np
import pytest

from cfpo_jax import async_rollout
from cfpo_jax.async_rollout import FixedLagProducer, ProducerError


class FakeData:
    """A data iterator with a resumable position."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return self.position - 1

    @property
    def state(self):
        return {"position": self.position}


def sample(params, prompt, step):
    """A fake rollout: depends on the policy, the prompt and the step's key only."""
    return params * 1.5 + prompt + 0.01 * step


def learn(params, rollout):
    return 0.9 * params + 0.1 * rollout


def synchronous_lagged(num_steps, k):
    """The reference, written out: rollout t from the params after max(t - k, 0) updates."""
    params, history = [1.0], []
    for t in range(num_steps):
        rollout = sample(params[max(t - k, 0)], t, t)
        params.append(learn(params[-1], rollout))
        history.append((t, max(t - k, 0), rollout))
    return params[-1], history


def run_async(num_steps, k, *, jitter=0.0, start=0, params=1.0, data=None, restored=(),
              stop_after=None, seed=0, threaded=True):
    """The trainer's use of the producer; with `stop_after` s returns what a checkpoint after
    step s saves (params, pending rollouts, data snapshot) instead of finishing."""
    data = data or FakeData()
    sleep = random.Random(seed)

    def generate(step, version, version_params):
        time.sleep(sleep.random() * jitter)
        return sample(version_params, next(data), step)

    history = []
    with FixedLagProducer(generate, max_staleness=k, start_step=start, num_steps=num_steps,
                          snapshot=lambda: data.state, restored=restored,
                          threaded=threaded) as producer:
        producer.publish(start, params)
        for t in range(start, num_steps):
            rollout = producer.get(t)
            time.sleep(sleep.random() * jitter)
            params = learn(params, rollout.value)
            producer.publish(t + 1, params)
            history.append((t, rollout.version, rollout.value))
            if stop_after == t + 1:
                return params, history, producer.pending(t + 1)
    return params, history


@pytest.mark.parametrize("threaded", [True, False])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rollout_of_step_t_comes_from_version_t_minus_k_whatever_the_timing(k, threaded):
    final, reference = synchronous_lagged(12, k)
    for jitter, seed in [(0.0, 0), (0.01, 1), (0.01, 2)]:
        got, history = run_async(12, k, jitter=jitter, seed=seed, threaded=threaded)
        assert [h[1] for h in history] == [max(t - k, 0) for t in range(12)]
        np.testing.assert_allclose([h[2] for h in history], [r[2] for r in reference], rtol=0, atol=0)
        assert got == final


def test_lag_changes_the_run():
    """The fixed lag is real: k = 1 trains on other rollouts than the synchronous loop."""
    assert synchronous_lagged(6, 1)[0] != synchronous_lagged(6, 0)[0]
    assert run_async(6, 1)[0] == synchronous_lagged(6, 1)[0]


def test_staleness_metrics():
    assert async_rollout.staleness_metrics(5, [3, 3, 4, 5]) == dict(staleness_mean=1.25,
                                                                    staleness_max=2.0)
    assert [async_rollout.behaviour_version(t, 2) for t in range(5)] == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("threaded", [True, False])
@pytest.mark.parametrize("stop", [1, 2, 5])
def test_pending_and_restore_resume_exactly(stop, threaded):
    """Checkpoint after step `stop` (params, the k queued rollouts, the iterator snapshot from
    before step stop+k's prompts), then a new producer from it: the uninterrupted run's end."""
    k, steps = 2, 9
    uninterrupted, full_history = run_async(steps, k, jitter=0.005)
    params, history, (pending, snapshot) = run_async(steps, k, jitter=0.005, stop_after=stop,
                                                     seed=3, threaded=threaded)
    assert [r.step for r in pending] == [stop, stop + 1]
    assert [r.version for r in pending] == [max(stop - 2, 0), max(stop - 1, 0)]
    data = FakeData()
    data.position = snapshot["position"]
    assert data.position == stop + k  # the prompts of steps < stop + k were pulled already
    resumed, rest = run_async(steps, k, start=stop, params=params, data=data, restored=pending,
                              threaded=threaded)
    assert resumed == uninterrupted
    assert history + rest == full_history


def test_a_resume_without_the_queue_is_refused():
    with pytest.raises(ValueError, match=r"queued rollouts of steps \[3, 4\]"):
        FixedLagProducer(lambda *a: 0, max_staleness=2, start_step=3, num_steps=10)
    with pytest.raises(ValueError, match="max_staleness=-1"):
        FixedLagProducer(lambda *a: 0, max_staleness=-1, start_step=0, num_steps=10)


def failing_reward_worker(step):
    raise ConnectionError(f"reward worker died scoring step {step}")


def test_a_producer_failure_surfaces_in_the_trainer_with_its_traceback():
    def generate(step, version, params):
        if step == 3:
            failing_reward_worker(step)
        return step

    finished = threading.Event()

    def trainer():
        with FixedLagProducer(generate, max_staleness=1, start_step=0, num_steps=10) as producer:
            producer.publish(0, 0)
            for t in range(10):
                producer.get(t)
                producer.publish(t + 1, t + 1)

    with pytest.raises(ProducerError) as info:
        try:
            trainer()
        finally:
            finished.set()
    assert finished.is_set()
    message = str(info.value)
    assert "failed at step 3" in message and "failing_reward_worker" in message
    assert "ConnectionError: reward worker died scoring step 3" in message
    assert isinstance(info.value.__cause__, ConnectionError)


def test_close_stops_a_waiting_producer():
    producer = FixedLagProducer(lambda *a: 0, max_staleness=1, start_step=0, num_steps=10)
    # No version published: the producer waits; close must end it, and `get` must not hang.
    producer.close(timeout=5)
    assert not producer._thread.is_alive()
    with pytest.raises(ProducerError, match="closed"):
        producer.get(0)


def test_without_a_thread_publish_generates_in_line_and_raises_a_failure_itself():
    calls = []

    def generate(step, version, params):
        calls.append((step, version))
        if step == 2:
            failing_reward_worker(step)
        return step

    producer = FixedLagProducer(generate, max_staleness=1, start_step=0, num_steps=5,
                                threaded=False)
    producer.publish(0, 0)
    assert calls == [(0, 0), (1, 0)]  # what version 0 allows at lag 1, at once
    assert producer.get(0).value == 0
    with pytest.raises(ConnectionError, match="scoring step 2"):
        producer.publish(1, 1)
