"""Makes lm-eval's own command line know `--model cfpo_jax` once cfpo_jax is installed.

    pip install -e '.[eval]'
    lm_eval --model cfpo_jax --model_args pretrained=<dir> --tasks arc_easy,hellaswag,winogrande

lm-eval 0.4 (0.4.13, and its main branch as of 2026-08) finds models only in its registry, which
`lm_eval.models` fills from its own table when first imported; it reads no entry points and has no
plugin mechanism (EleutherAI/lm-evaluation-harness#3282 asks for one; #3672 proposes an
`--include_package` flag). A Python entry point would therefore be ignored. What does run in
every interpreter of an environment is a `.pth` file in site-packages: the wheel (and the editable
install) ships `cfpo_jax_lm_eval.pth`, whose one line is `import cfpo_jax.lm_eval_plugin;
cfpo_jax.lm_eval_plugin.install()`. `install()` imports nothing else and only puts a finder on
`sys.meta_path` that waits for `lm_eval.models`; right after lm-eval has filled its table,
`register()` adds "cfpo_jax" as a lazy "module:class" entry, the form lm-eval uses for its own
models. So JAX and `cfpo_jax.lm_eval` are imported only when a run asks for `--model cfpo_jax`,
and uninstalling cfpo_jax removes the hook with the package. Without an install (a checkout on
PYTHONPATH), `python -m cfpo_jax.lm_eval` is the same command line.
"""

import sys

MODEL_NAME = "cfpo_jax"
MODEL_CLASS = "cfpo_jax.lm_eval:CfpoJaxLM"
_HOOKED_MODULE = "lm_eval.models"


def register() -> None:
    """Adds "cfpo_jax" to lm-eval's model registry, unless it is there already."""
    # lm-eval's own table first: `get_model` imports it only while the registry is empty, so a
    # registry holding "cfpo_jax" alone would not know "hf".
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_CLASS)


class _RegisterAfterExec:
    """The real loader of `lm_eval.models`, then `register()`; everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name):  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class _LmEvalModelsFinder:
    """Meta-path finder that answers for `lm_eval.models` only: the spec the other finders give,
    with its loader wrapped."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Called by `cfpo_jax_lm_eval.pth` at interpreter start-up (see the module docstring)."""
    if _HOOKED_MODULE in sys.modules:  # lm-eval's table is filled already
        register()
    elif not any(isinstance(finder, _LmEvalModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LmEvalModelsFinder())
