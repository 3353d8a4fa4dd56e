"""`memsave-fx plan pkg.module:factory [--batch-size 8 ...]`: print a model's memory plan.
`memsave-fx selftest [--device cpu|cuda]`: check memsave's gradients and savings on this torch.

The factory returns `(model, inputs)`: inputs are one tensor, a tuple of positional arguments,
or a dict of keyword arguments; `(model, args, kwargs)` gives both. Every option the command
does not know (`--batch-size 8`) is passed to the factory as a keyword argument (`batch_size=8`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import MemsaveConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memsave-fx", description="Inspect what the memsave backend keeps for backward.")
    commands = parser.add_subparsers(dest="command", required=True)
    plan_parser = commands.add_parser(
        "plan",
        help="print the memory plan of a model, computed on fake tensors",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan_parser.add_argument("factory", help="pkg.module:function returning (model, inputs)")
    plan_parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a memsave or Inductor option, as in torch.compile(options=...); memsave's: "
        f"{', '.join(sorted(MemsaveConfig.option_names()))}",
    )
    plan_parser.add_argument("--largest", type=int, default=10, metavar="N", help="list the N largest tensors")
    plan_parser.add_argument("--json", type=Path, metavar="FILE", help="also write the plan as JSON")
    plan_parser.add_argument("--plot", type=Path, metavar="FILE", help="also draw the plan as a PNG")
    selftest_parser = commands.add_parser(
        "selftest",
        help="check memsave on this torch and device: gradients against eager PyTorch, saved bytes against Inductor",
        description="Compile small models covering every exact rewrite with eager PyTorch, stock Inductor and "
        "memsave; compare the gradients and the saved bytes, and the plan with the measurement. Exits 1 naming "
        "the failing cases.",
    )
    selftest_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    arguments, extra_arguments = parser.parse_known_args(argv)
    if arguments.command == "selftest":
        if extra_arguments:
            selftest_parser.error(f"unrecognized arguments: {' '.join(extra_arguments)}")
        return _selftest(selftest_parser, arguments.device)
    return _plan(plan_parser, arguments, extra_arguments)


def _selftest(parser: argparse.ArgumentParser, device: str) -> int:
    from .selftest import run_selftest

    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available to torch {torch.__version__}; valid here: --device cpu")
    return 0 if run_selftest(device).passed else 1


def _plan(parser: argparse.ArgumentParser, arguments: argparse.Namespace, factory_arguments: list[str]) -> int:
    from .plan import plan

    factory = _load(parser, arguments.factory)
    made = factory(**_keyword_arguments(parser, factory_arguments))
    model, args, kwargs = _unpack(parser, arguments.factory, made)
    options = dict(_option(parser, text) for text in arguments.option)
    memory_plan = plan(model, *args, options=options or None, **kwargs)
    print(memory_plan.table(arguments.largest))
    if arguments.json:
        arguments.json.write_text(memory_plan.to_json())
    if arguments.plot:
        memory_plan.plot(arguments.plot)
    return 0


def _load(parser: argparse.ArgumentParser, spec: str) -> Any:
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        parser.error(f"FACTORY must look like pkg.module:function, got {spec!r}")
    # Like `python -m`: modules of the working directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        parser.error(f"cannot import {module_name!r}: {error}")
    factory = getattr(module, function_name, None)
    if not callable(factory):
        parser.error(f"{module_name!r} has no function {function_name!r}")
    return factory


def _unpack(parser: argparse.ArgumentParser, spec: str, made: Any) -> tuple[torch.nn.Module, tuple, dict]:
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        parser.error(f"{spec} must return (model, inputs) or (model, args, kwargs), got {type(made).__name__}")
    model, inputs, *rest = made
    if rest:
        if not isinstance(inputs, (tuple, list)) or not isinstance(rest[0], dict):
            parser.error(f"{spec} returned three values: they must be (model, args tuple, kwargs dict)")
        return model, tuple(inputs), rest[0]
    if isinstance(inputs, dict):
        return model, (), inputs
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}


def _keyword_arguments(parser: argparse.ArgumentParser, words: list[str]) -> dict[str, Any]:
    """["--batch-size", "8", "--pretrained"] -> {"batch_size": 8, "pretrained": True}."""
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            parser.error(f"unexpected argument {word!r}: factory arguments look like --name value")
        name, has_value, value = word[2:].partition("=")
        if not has_value:
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            value = words[i + 1] if has_value else ""
            i += has_value
        kwargs[name.replace("-", "_")] = _literal(value) if has_value else True
        i += 1
    return kwargs


def _option(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    key, has_value, value = text.partition("=")
    if not has_value or not key:
        parser.error(f"--option takes KEY=VALUE, got {text!r}")
    return key, _literal(value)


def _literal(text: str) -> Any:
    """A Python literal where the text is one ("8", "0.5", "true"), else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
