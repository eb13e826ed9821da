"""The non-editable install: the wheel built from this tree, installed into a directory of its
own (no dependencies: they are this environment's), runs the quickstart from another directory
and finds the shipped configs by name."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_runs_the_quickstart_and_finds_configs_by_name(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), ROOT], check=True, timeout=300)
    (wheel,) = wheels.iterdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    # The installed copy first on the path, the checkout nowhere (cwd is elsewhere).
    env = dict(os.environ, PYTHONPATH=str(site))
    found = subprocess.run(
        [sys.executable, "-c", "import cfpo_jax, cfpo_jax.config as c; print(cfpo_jax.__file__); "
         "print(c.find('math_qwen.py:1.5b')); print(c.find('studies/stability_quickstart.py'))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=True)
    package, math_qwen, study = found.stdout.split()
    assert package.startswith(str(site)), package
    assert math_qwen == os.path.join(str(site), "cfpo_jax", "configs", "math_qwen.py") + ":1.5b"
    assert os.path.isfile(study)

    run = subprocess.run(
        [sys.executable, "-m", "cfpo_jax.train", "--workdir=run", "--config.train.num_steps=1",
         "--config.warmstart.steps=1", "--config.eval.sources=()", "--config.train.export_hf=False",
         "--config.train.tensorboard=False"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: mean reward" in run.stdout, run.stdout
    assert (elsewhere / "run" / "metrics.jsonl").is_file()
    # A name that is no config fails with the shipped names.
    bad = subprocess.run([sys.executable, "-m", "cfpo_jax.train", "--config=nope.py"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "quickstart.py" in bad.stderr
