"""benchmarks/accelerator.sh, the one call that takes every accelerator timing: its dry run executes
the same steps (the same scripts, tiny shapes) on CPU, so the sequence cannot rot before a GPU or
TPU is lent; its figures are checked against formulas written here. Also: a step over its time
limit is killed with its children, and the published-figure table knows only what it has a source for.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.fixtures.paths import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import accelerator  # noqa: E402
import chips  # noqa: E402
import compile as compile_benchmark  # noqa: E402  (benchmarks/compile.py)
import shapes  # noqa: E402

STEPS = ["env", "attention", "sampler", "train_step", "long_tail", "lora_sampling", "rl_step",
         "async_rl"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator") / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "XLA_FLAGS", "JAX_PLATFORMS")}
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "accelerator.sh"), "--dry-run", "--out", str(out)],
                         env=dict(env, PYTHON=sys.executable), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records[0], {r["name"]: r for r in records[1:]}, [r["name"] for r in records[1:]], str(out)


def test_dry_run_runs_every_step_and_records_the_run(dry_run):
    run, steps, order, _ = dry_run
    assert order == STEPS
    assert {name: r["status"] for name, r in steps.items()} == dict.fromkeys(STEPS, "ok")
    assert run["dry_run"] and run["platform"] == "cpu" and run["device_kind"] == "cpu"
    assert run["chip"] is None  # no published figures for a CPU: reported missing, not guessed
    assert run["versions"]["jax"] and run["date"] and run["commit"]
    for name in STEPS[2:]:
        assert steps[name]["command"].startswith("python benchmarks/") and "--json" in steps[name]["command"]
    attention = steps["attention"]["figures"]  # the cuDNN test skips on CPU, saying why
    assert (attention["passed"], attention["failed"], attention["skipped"]) == (0, 0, 1)
    assert "needs a GPU" in attention["notes"]["test_cudnn_matches_reference_in_bfloat16"]


def test_summary_of_a_results_file_has_a_row_per_step(dry_run, capsys):
    assert accelerator.main(["--summary", dry_run[3]]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == STEPS
    assert all(row.split(" | ")[2] == "ok" for row in rows)


def qwen2_params(s):
    """Parameters of a Qwen2 decoder with tied embeddings (q/k/v biases, two RMS norms a layer)."""
    D, F, N, K, H = s["hidden_size"], s["intermediate_size"], s["num_heads"], s["num_kv_heads"], s["head_dim"]
    layer = D * N * H + N * H + 2 * (D * K * H + K * H) + N * H * D + 3 * D * F + 2 * D
    return s["vocab_size"] * D + s["num_layers"] * layer + D


def test_sampler_figures_follow_from_the_timings(dry_run):
    figures = dry_run[1]["sampler"]["figures"]
    assert figures["hbm_bandwidth_spec"] is None
    (row,) = figures["rows"]
    tiny, batch, P, N = shapes.SHAPES["tiny"], row["batch"], row["prompt_len"], row["new_tokens"]
    assert row["tokens_per_s"] == pytest.approx(batch * N / row["jax_s"])
    assert row["decode_ms_per_step"] == pytest.approx(1e3 * (row["jax_s"] - row["jax_prefill_s"]) / (N - 1))
    # Decode steps 1 .. N-1 read every bf16 weight, and keys + values of the P + s valid slots of each row.
    kv_bytes_per_slot = 2 * tiny["num_layers"] * tiny["num_kv_heads"] * tiny["head_dim"] * 2
    reads = (N - 1) * 2 * qwen2_params(tiny) + batch * sum(P + s for s in range(1, N)) * kv_bytes_per_slot
    assert row["decode_bytes"] == reads
    assert row["roofline_fraction"] == pytest.approx(
        reads / figures["copy_bandwidth"] / (row["jax_s"] - row["jax_prefill_s"]))
    assert row["roofline_fraction_spec"] is None


def test_train_step_long_tail_lora_and_rl_figures_are_consistent(dry_run):
    steps = dry_run[1]
    train = steps["train_step"]["figures"]
    (row,) = train["rows"]
    assert train["peak_flops_spec"] is None and row["mfu_spec"] is None
    assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["T"] / row["step_s"])
    assert train["device_count"] == 1
    assert row["mfu"] == pytest.approx(row["flops"] / row["step_s"] / 1e12 / train["peak_tflops_measured"])

    tail = steps["long_tail"]["figures"]
    assert tail["engine_tokens_per_s"] * tail["engine_s"] == pytest.approx(tail["useful_tokens"])
    assert tail["speedup"] == pytest.approx(tail["static_s"] / tail["engine_s"])
    # Static batches of K rows each run until their longest row ends: at least the useful tokens / K steps.
    assert tail["static_decode_steps"] >= tail["useful_tokens"] / tail["max_concurrent"]

    (lora,) = steps["lora_sampling"]["figures"]["rows"]
    assert lora["merged_over_on_the_fly"] == pytest.approx(lora["on_the_fly_s"] / lora["merged_s"])

    rl = steps["rl_step"]["figures"]
    assert rl["step_s"] == pytest.approx(rl["sample_s"] + rl["score_s"] + rl["learn_s"])
    assert rl["sequences"] == rl["prompts"] * rl["samples"]
    assert rl["new_tokens"] == rl["sequences"] * rl["new_tokens_per_row"]
    assert rl["learn_tokens"] == rl["sequences"] * (rl["prompt_len"] + rl["new_tokens_per_row"]) * rl["epochs"]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads process states from Linux /proc")
def test_a_step_over_its_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    spawn = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(600)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    step = accelerator.Step("sleeper", "", "", ["-c", spawn], limit_s=3)
    start = time.monotonic()
    record = accelerator.run_step(step, 3, str(tmp_path), dict(os.environ))
    assert record["status"] == "timed out after 3 s" and time.monotonic() - start < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_published_figures_only_for_listed_chips():
    # Transcribed from the datasheets (NVIDIA prints bf16 with 2:4 sparsity: dense is half).
    h100, h200 = chips.lookup("NVIDIA H100 80GB HBM3"), chips.lookup("NVIDIA H200")
    assert (h100.bf16_flops, h100.hbm_bytes_per_s) == (1979e12 / 2, 3.35e12)
    assert (h200.bf16_flops, h200.hbm_bytes_per_s) == (1979e12 / 2, 4.8e12)
    assert (chips.lookup("TPU v5 lite").bf16_flops, chips.lookup("TPU v5p").hbm_bytes_per_s) == (197e12, 2765e9)
    for unknown in ("cpu", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "TPU v7"):
        assert chips.lookup(unknown) is None


def test_every_recorded_compile_config_builds_its_mesh_on_its_target(monkeypatch):
    """benchmarks/compile.py's default configs per target load, validate and lay their mesh over
    exactly that target's chips (code_qwen:1.5b's one-device mesh could not take a v5e-8's 8): the
    fake CPU devices for up to 8 chips, a pod's compile-only devices (libtpu, the CUDA plugin)
    beyond, over both slices of the two-slice target."""
    import importlib.util

    import jax

    from cfpo_jax.aot import targets

    monkeypatch.chdir(ROOT)  # the specs name configs/ relative to the repository
    plugins = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}
    missing = []
    for target_name, specs in compile_benchmark.CONFIGS.items():
        target = targets.get(target_name)
        if target.chips <= len(jax.devices()):
            devices = jax.devices()[:target.chips]
        elif importlib.util.find_spec(plugins[target.platform]) is None:
            missing.append(target_name)
            continue
        else:
            devices = targets.devices(target_name)
        for config_spec in specs:
            config = compile_benchmark.load_config(config_spec)
            mesh = compile_benchmark.make_mesh(config, target, devices)
            assert mesh.size == target.chips, (target_name, config_spec)
            assert mesh.shape["data"] == target.slices * config.mesh.data, (target_name, config_spec)
    if missing:
        pytest.skip(f"no compile-only devices for {missing} (pip install -e '.[compile]')")


@pytest.mark.parametrize("name", ["v5p-16", "h100x16"])
def test_side_meshes_are_the_two_hosts_of_the_pod(name, monkeypatch):
    """`compile.py --side`: math_qwen:7b's rollout mesh is the first host's chips, its learner mesh
    the second's (mesh.rollout_devices 0 in the config: half the chips), each with its own sizes —
    fsdp over the host — and the halves share no chip."""
    import importlib.util

    from cfpo_jax.aot import targets

    target = targets.get(name)
    plugin = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}[target.platform]
    if importlib.util.find_spec(plugin) is None:
        pytest.skip(f"{plugin} is not installed (pip install -e '.[compile]')")
    monkeypatch.chdir(ROOT)
    devices = targets.devices(name)
    meshes = {}
    for side in ("rollout", "learner"):
        config = compile_benchmark.load_config("configs/math_qwen.py:7b")
        meshes[side] = compile_benchmark.side_mesh(config, target, devices, side)
        assert config.mesh.rollout_devices == target.chips // 2
    hosts = {side: {d.process_index for d in m.devices.flat} for side, m in meshes.items()}
    assert len(hosts["rollout"]) == len(hosts["learner"]) == 1 and hosts["rollout"] != hosts["learner"]
    for mesh in meshes.values():
        assert dict(mesh.shape) == {"data": 1, "fsdp": target.chips // 2, "expert": 1, "tensor": 1}
    assert not {d.id for d in meshes["rollout"].devices.flat} & {d.id for d in meshes["learner"].devices.flat}
