"""The policy as a run loads it: its mesh, the tiny model or a Hugging Face checkpoint placed in
its shardings, LoRA adapters on a frozen base, the tokenizer and its special ids.

`load(config, workdir, mesh)` is what the trainer, the benchmarks and the tests use; it reads the
`model`, `lora` and `seed` fields of the config itself.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx
from jax.experimental import multihost_utils

from cfpo_jax import lora, models, sharding, tiny


def make_meshes(config, devices=None):
    """(rollout mesh, learner mesh) over `devices` (default all) per `mesh.rollout_devices`
    (`sharding.placement`: one mesh twice when colocated, else the first N devices sample and the
    rest learn). The learner's ('data', 'fsdp', 'expert', 'tensor') mesh ('data' spans `mesh.dcn`
    slices) is checked against the micro-batch it must split."""
    rollout_mesh, mesh = sharding.placement(config.mesh, devices)
    rl = config.rl
    batch_shards = sharding.batch_shards(mesh)
    micro = rl.micro_batch_size or config.data.batch_size * rl.group_size // rl.num_minibatches
    if micro % batch_shards:
        raise ValueError(
            f"the micro-batch of {micro} sequences (rl.micro_batch_size, or data.batch_size × "
            f"rl.group_size / rl.num_minibatches) must divide over the {batch_shards} "
            f"data × fsdp × expert shards of the mesh {dict(mesh.shape)}"
        )
    return rollout_mesh, mesh


def make_mesh(config, devices=None):
    """The learner mesh of `make_meshes` (the run's only mesh when colocated)."""
    return make_meshes(config, devices)[1]


def build_tiny(config, workdir: str) -> str:
    """The tiny model's directory in `workdir`. Process 0 writes it; the others wait for it, and
    write their own copy only where they do not see the workdir's (no shared file system)."""
    path = os.path.join(workdir, "tiny_model")

    def build():
        # On this process's own devices, whatever mesh is in context: a process may hold none
        # of it (the sampling process of a disaggregated run holds no learner device).
        with jax.set_mesh(sharding.make_mesh(devices=jax.local_devices())):
            tiny.build(path, seed=config.seed, **config.model.tiny.to_dict())
    if jax.process_index() == 0:
        build()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tiny_model written")
        build()  # returns at once where process 0's copy is visible
    return path


@dataclasses.dataclass(frozen=True)
class Policy:
    """A loaded policy. `graphdef`, `params` (what trains: every parameter, or the adapters with
    LoRA) and `frozen` (the rest: empty, or the frozen base) are its `nnx.split`."""

    graphdef: nnx.GraphDef
    params: nnx.State
    frozen: nnx.State
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int
    model_path: str  # the (base) model's checkpoint directory or hub id
    base_model: dict | None  # `lora.base_fingerprint` of the base with LoRA, else None


def load(config, workdir: str, mesh) -> Policy:
    """The policy of `config` with its parameters placed in their shardings on `mesh`; with
    `config.lora.rank` > 0 it carries fresh adapters on a base of `config.lora.base_dtype`."""
    model_path = config.model.path
    if model_path == "tiny":
        model_path = build_tiny(config, workdir)
    model = models.from_pretrained(model_path, mesh=mesh,
                                   param_dtype=config.lora.base_dtype or config.model.param_dtype,
                                   dtype=config.model.dtype, remat=config.model.remat,
                                   remat_policy=config.model.remat_policy,
                                   attention=config.model.attention,
                                   unroll_layers=config.model.unroll_layers,
                                   moe_matmul=config.model.moe_matmul)
    tokenizer = models.load_tokenizer(model_path)
    eos_ids = tuple(models.eos_token_ids(model_path, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    adapters = config.lora.rank > 0
    if adapters:
        model = lora.adapt(model, rank=config.lora.rank, alpha=config.lora.alpha,
                           targets=config.lora.targets, seed=config.seed, mesh=mesh)
    # With LoRA the adapters train and the base is `frozen`; otherwise every parameter trains.
    graphdef, params, frozen = lora.split(model) if adapters else nnx.split(model, nnx.Param, ...)
    return Policy(graphdef=graphdef, params=params, frozen=frozen, tokenizer=tokenizer,
                  eos_ids=eos_ids, pad_id=pad_id, model_path=model_path,
                  base_model=lora.base_fingerprint(model_path) if adapters else None)
