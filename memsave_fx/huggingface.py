"""memsave in Hugging Face's trainers: `Trainer`, TRL's `SFTTrainer` and others built on them.

    trainer = SFTTrainer(..., callbacks=[MemsaveCallback()])

`TrainingArguments(torch_compile_backend="memsave")` fails: accelerate accepts only the backend
names of its own `DynamoBackend` enum. Handing the Trainer a `torch.compile(model)` wrapper
trains, but the Trainer then reads the wrapper's signature (no label columns) and saves the
weights under `_orig_mod.` names. The callback instead compiles the Trainer's own model in
place (`nn.Module.compile`) when training begins, after TRL or the Trainer applied peft and
placed the model, so names, signature and checkpoints stay those of the model.

Importing this module imports transformers; `import memsave_fx` does not.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .backend import MemsaveBackend, backend
from .config import MemsaveConfig


class MemsaveCallback(TrainerCallback):
    """Compiles the Trainer's model in place with memsave when training begins.

    `options` are memsave's and Inductor's, as `torch.compile(options=...)` takes them; memsave's
    options not given come from `MEMSAVE_<OPTION>` variables. `compiler` is the backend object:
    `callback.compiler.compiled` records what memsave did to each graph. After the first step
    it warns if no graph with a backward was compiled: then memsave saved nothing.
    """

    def __init__(self, **options: Any) -> None:
        memsave_options, inductor_options = MemsaveConfig.split_options(options)
        self.compiler: MemsaveBackend = backend(**memsave_options)
        self.compiler.resolve(None, inductor_options)  # a misspelt option fails here, not at the first step
        self.inductor_options = inductor_options or None
        self._compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._checked = False

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _refuse_torch_compile(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        _refuse_torch_compile(args)
        if model is None:
            raise ValueError("MemsaveCallback: the Trainer passed no model to on_train_begin; there is nothing to compile")
        if model not in self._compiled:  # train() again, or resumed: compiled already
            model.compile(backend=self.compiler, options=self.inductor_options)
            self._compiled.add(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._checked:
            return
        self._checked = True
        if not any(graph.has_backward for graph in self.compiler.compiled):
            warnings.warn(
                f"MemsaveCallback: a training step of {type(model).__name__} compiled no graph with a backward, so "
                "memsave changed nothing: Dynamo ran the model eagerly (a forward Dynamo skips, such as a bare "
                "nn.Sequential on torch 2.13 and older, or a graph break at its start; TORCH_LOGS=graph_breaks says which)",
                stacklevel=2,
            )


def _refuse_torch_compile(args: Any) -> None:
    if getattr(args, "torch_compile", False):
        raise ValueError(
            "MemsaveCallback compiles the model itself: leave TrainingArguments' torch_compile off "
            f"(it is on, with torch_compile_backend={args.torch_compile_backend!r}), or the model is compiled twice"
        )
