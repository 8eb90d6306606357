"""The module paths from before the packages (``minilora.functional``, ``minilora.peft``, ...)
stay importable: each old name is the moved module itself, not a copy.

The layout is ``ops`` (the functional core), ``formats`` (file formats), ``toolkit`` (layers,
losses, optimisers), ``models``, ``oracle``, ``testing`` and ``tools`` (the CLI, demos and
benchmarks); ``minilora.peft`` is also a public name (API.md).
"""

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    **dict.fromkeys(("functional", "blocks", "dora", "lora_numpy", "lora_numba", "backends",
                     "_checks", "_jit"), "ops"),
    **dict.fromkeys(("safetensors", "npz", "peft", "_io", "_json"), "formats"),
    **dict.fromkeys(("layer", "modules", "optim", "losses", "init", "checkpoint"), "toolkit"),
    **dict.fromkeys(("precision", "tolerance"), "oracle"),
    **dict.fromkeys(("cli", "_argtypes", "demo", "demo_model", "bench", "bench_model",
                     "selfcheck"), "tools"),
}
# Not minilora.gradcheck: that name is the function ``ml.gradcheck``, and importing an alias
# module by it would set the package's attribute to the module (the import system binds a
# submodule on its parent). Its module is minilora.ops.gradcheck.


def new_name(old):
    """'minilora.peft' -> 'minilora.formats.peft'; None for a name that did not move."""
    head, _, leaf = old.partition(".")
    return f"minilora.{MOVED[leaf]}.{leaf}" if head == "minilora" and leaf in MOVED else None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module at its new one."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if new_name(fullname) else None

    def create_module(self, spec):
        module = importlib.import_module(new_name(spec.name))
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # the module keeps its own spec


def install():
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
