r"""Explaining a layer inside a TorchScript model (used by the loaders and the CLI).

Forward hooks cannot be registered on ``ScriptModule`` submodules, so Captum's layer methods
cannot see inside a ``torch.jit.load``-ed model. :class:`TorchScriptLayerModel` evaluates the
compiled code of the layer's ancestors node by node in Python, runs every other submodule
(and the layer itself) compiled, and routes the layer's output through an eager identity
module that hooks can see. :func:`expose_layer` builds it and checks it reproduces the
compiled model's output on an example batch. This relies on TorchScript's graph API
(``torch._C``); code it cannot evaluate raises a clear error suggesting an eager factory.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._utils.layers import EAGER_FALLBACK, LayerTap, find_last_linear, is_linear, resolve_layer
from ._utils.model_state import detached, gradients_on
from ._utils.validation import same_model_output

_LIST_AT_MOST = 5


class _TorchScriptUnsupported(ValueError):
    pass


class TorchScriptLayerModel(nn.Module):
    r"""Runs a TorchScript model so that one of its layers can be explained.

    Hooks cannot be registered on ``ScriptModule``\ s, so the methods of the layer's
    ancestors (the model itself, the containers on the way down) are evaluated node by node
    in Python, while every other submodule, and the layer itself, runs compiled. The layer's
    output passes through ``tap``, an eager identity module: give ``tap`` to any Captum
    layer method. Straight-line code, ``if`` and ``for`` are supported in the ancestors'
    methods; free functions are looked up by their Python name (``torch.nn.functional.relu``).

    Build it with :func:`expose_layer`.
    """

    def __init__(
        self, script_module: nn.Module, layer: str | None, *, head: str | None = None
    ) -> None:
        super().__init__()
        self.script_module = script_module
        self.layer_name = layer
        self.tap = LayerTap(layer or "")
        self.head_name = head
        #: an eager ``nn.Linear`` that shares the weight and bias of the compiled linear layer
        #: ``head`` and runs in its place, so that GradTrust (hooks, ``.weight``) can see it
        self.head = _eager_linear(dict(script_module.named_modules())[head]) if head else None
        self.training = self.tap.training = bool(script_module.training)

    def forward(self, *args: Any) -> Any:
        return self._run_method(self.script_module, "", "forward", args)

    # -- interpreter ---------------------------------------------------------------------

    def _on_path(self, path: str) -> bool:
        return path == "" or any(
            name is not None and name.startswith(path + ".")
            for name in (self.layer_name, self.head_name)
        )

    def _run_method(self, module: Any, path: str, method: str, args: tuple) -> Any:
        graph = _compiled(module, method).graph
        inputs = list(graph.inputs())
        if len(inputs) - 1 != len(args):
            raise _TorchScriptUnsupported(
                f"TorchScript method {method}() of {path or 'the model'} takes "
                f"{len(inputs) - 1} arguments, got {len(args)}."
            )
        env: dict[int, Any] = {inputs[0].unique(): module}
        paths: dict[int, str] = {inputs[0].unique(): path}
        for value, arg in zip(inputs[1:], args):
            env[value.unique()] = arg
        outputs = self._run_block(graph, env, paths)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _run_block(self, block: Any, env: dict[int, Any], paths: dict[int, str]) -> list:
        for node in block.nodes():
            self._run_node(node, env, paths)
        return [env[v.unique()] for v in block.outputs()]

    def _run_node(self, node: Any, env: dict[int, Any], paths: dict[int, str]) -> None:
        kind = node.kind()
        args = [env[v.unique()] for v in node.inputs()]
        outs = list(node.outputs())
        if kind == "prim::Constant":
            if node.hasAttribute("name") and not node.hasAttribute("value"):
                env[outs[0].unique()] = _python_function(str(outs[0].type()))
            else:
                env[outs[0].unique()] = outs[0].toIValue()
            return
        if kind == "prim::GetAttr":
            owner = node.inputs().__next__().unique()
            name = node.s("name")
            env[outs[0].unique()] = getattr(args[0], name)
            if owner in paths and isinstance(env[outs[0].unique()], torch.jit.ScriptModule):
                parent = paths[owner]
                paths[outs[0].unique()] = f"{parent}.{name}" if parent else name
            return
        if kind == "prim::SetAttr":
            setattr(args[0], node.s("name"), args[1])
            return
        if kind == "prim::CallMethod":
            method = node.s("name")
            owner = node.inputs().__next__().unique()
            path = paths.get(owner)
            # overloaded forwards are compiled as forward__0, forward__1, ...
            is_forward = method == "forward" or method.startswith("forward__")
            if is_forward and path is not None and path in (self.layer_name, self.head_name):
                run = self.head if path == self.head_name else _compiled(args[0], method)
                result = _call_compiled(run, args[1:])
                if path == self.layer_name:
                    result = self.tap(result)
            elif path is not None and self._on_path(path):
                result = self._run_method(args[0], path, method, tuple(args[1:]))
            else:
                result = _call_compiled(_compiled(args[0], method), args[1:])
            self._bind(outs, result, env)
            return
        if kind == "prim::CallFunction":
            self._bind(outs, args[0](*args[1:]), env)
            return
        if kind == "prim::If":
            chosen = node.blocks().__iter__()
            then_block = next(chosen)
            else_block = next(chosen)
            block = then_block if args[0] else else_block
            results = self._run_block(block, env, paths)
            for value, result in zip(outs, results):
                env[value.unique()] = result
            return
        if kind == "prim::Loop":
            self._run_loop(node, args, outs, env, paths)
            return
        simple = _SIMPLE_NODES.get(kind)
        if simple is not None:
            self._bind(outs, simple(node, args), env)
            return
        if kind == "aten::append" and isinstance(args[0], list):
            args[0].append(args[1])
            self._bind(outs, args[0], env)
            return
        container_operation = _CONTAINER_NODES.get(kind)
        if container_operation is not None and args and isinstance(args[0], list | dict):
            # the schemas of generic lists and dicts (t[], Dict(t, t)) match no Python one:
            # `x.shape[-2:]`, torchvision's `out["out"] = x`
            self._bind(outs, container_operation(*args), env)
            return
        try:
            operation, _ = torch._C._jit_get_operation(kind)
        except RuntimeError:
            raise _TorchScriptUnsupported(
                f"cannot evaluate the TorchScript operation {kind} on the way to layer "
                f"{self.layer_name or self.head_name!r}"
            ) from None
        positional, keywords = _split_arguments(node.schema(), args)
        self._bind(outs, operation(*positional, **keywords), env)

    def _run_loop(self, node, args, outs, env, paths) -> None:
        trip_count, condition, *carried = args
        body = next(node.blocks().__iter__())
        body_inputs = list(body.inputs())
        iteration = 0
        while iteration < trip_count and condition:
            env[body_inputs[0].unique()] = iteration
            for value, item in zip(body_inputs[1:], carried):
                env[value.unique()] = item
            results = self._run_block(body, env, paths)
            condition, carried = results[0], results[1:]
            iteration += 1
        for value, item in zip(outs, carried):
            env[value.unique()] = item

    @staticmethod
    def _bind(outs: list, result: Any, env: dict[int, Any]) -> None:
        if not outs:  # an in-place operation (item assignment, extend)
            return
        if len(outs) == 1:
            env[outs[0].unique()] = result
        else:
            for value, item in zip(outs, result):
                env[value.unique()] = item


def _call_compiled(function: Callable, args: Any) -> Any:
    """``function(*args)``, a compiled method called from Python.

    Under ``torch.no_grad()`` a scripted ``nn.MultiheadAttention`` called from Python fails
    in its fast path ("strides() called on an undefined Tensor"; the same module inside the
    whole scripted model runs). That call is repeated with gradients enabled (the standard
    path, the same attention) and its outputs detached, as no_grad would have left them.
    """
    try:
        return function(*args)
    except RuntimeError as error:
        if torch.is_grad_enabled() or "undefined Tensor" not in str(error):
            raise
    with gradients_on():
        result = function(*args)
    return detached(result)


def _compiled(module: Any, method: str) -> Any:
    """The compiled ``method`` of a ScriptModule; for a traced model's submodules too (their
    Python ``forward`` refuses to be called: "Trace submodules cannot be called")."""
    c_module = getattr(module, "_c", None)
    if c_module is not None and hasattr(c_module, "_get_method"):
        return c_module._get_method(method)
    return getattr(module, method)


def _raise_exception(node, args):
    raise RuntimeError(str(args[0]) if args else "TorchScript model raised an exception")


# Operators on Python containers: the compiled versions need typed TorchScript lists/dicts.
_SIMPLE_NODES: dict[str, Callable[[Any, list], Any]] = {
    "aten::__getitem__": lambda node, args: args[0][args[1]],
    "aten::len": lambda node, args: len(args[0]),
    "aten::list": lambda node, args: list(args[0]),
    "aten::__contains__": lambda node, args: args[1] in args[0],
    "aten::__is__": lambda node, args: args[0] is args[1],
    "aten::__isnot__": lambda node, args: args[0] is not args[1],
    "aten::__not__": lambda node, args: not args[0],
    "prim::ListConstruct": lambda node, args: list(args),
    # the message of a torch._assert (a vararg schema the operator call cannot take)
    "aten::format": lambda node, args: str(args[0]).format(*args[1:]),
    "prim::TupleConstruct": lambda node, args: tuple(args),
    "prim::DictConstruct": lambda node, args: dict(zip(args[0::2], args[1::2])),
    "prim::TupleUnpack": lambda node, args: tuple(args[0]),
    "prim::ListUnpack": lambda node, args: tuple(args[0]),
    "prim::TupleIndex": lambda node, args: args[0][args[1]],
    "prim::unchecked_cast": lambda node, args: args[0],
    "prim::Uninitialized": lambda node, args: None,
    "prim::RaiseException": _raise_exception,
    "prim::Print": lambda node, args: print(*args),
}


# Operators on Python lists and dicts whose tensor overloads share the name (aten::slice of a
# list, as `x.shape[-2:]` compiles; aten::add of two lists; item assignment).
_CONTAINER_NODES: dict[str, Callable[..., Any]] = {
    "aten::slice": lambda items, start=None, end=None, step=1: items[start:end:step],
    "aten::add": lambda items, other: items + list(other),
    "aten::extend": lambda items, other: items.extend(other),
    "aten::_set_item": lambda items, key, value: items.__setitem__(key, value),
    "aten::keys": lambda items: list(items.keys()),
    "aten::values": lambda items: list(items.values()),
    "aten::items": lambda items: list(items.items()),
}


@functools.lru_cache(maxsize=512)
def _keyword_names(schema: str) -> tuple[str | None, ...]:
    """Per argument of an operator schema: its name if keyword-only, else None."""
    if not schema or schema == "(no schema)":
        return ()
    parsed = torch._C.parse_schema(schema)
    return tuple(a.name if a.kwarg_only else None for a in parsed.arguments)


def _split_arguments(schema: str, args: list) -> tuple[list, dict[str, Any]]:
    """Graph nodes pass every argument by position; Python needs keyword-only ones by name."""
    names = _keyword_names(schema)
    if not names or all(n is None for n in names) or len(names) != len(args):
        return args, {}
    positional = [a for a, n in zip(args, names) if n is None]
    keywords = {n: a for a, n in zip(args, names) if n is not None}
    return positional, keywords


def _python_function(qualified: str) -> Callable:
    """The function behind a TorchScript function constant (``__torch__.pkg.fn``): the
    compiled function where this process compiled it, else the Python function of that
    name (TorchScript's ``___torch_mangle_N`` segments, which tell apart several compiled
    copies of one function, removed)."""
    compiled = torch.jit._state._python_cu.find_function(qualified)
    if compiled is not None:
        return compiled
    name = re.sub(r"___torch_mangle_\d+\.", "", qualified.removeprefix("__torch__."))
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        raise _TorchScriptUnsupported(
            f"the TorchScript model calls the function {name}, which is not importable here"
        ) from None


def _eager_linear(module: Any) -> nn.Linear:
    """An ``nn.Linear`` whose weight and bias share their memory with the (compiled) linear
    ``module``'s, as new Parameter objects: gradients taken through it never reach the
    user's model."""
    weight = module.weight
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach())
    return linear


def last_linear_name(model: nn.Module) -> str | None:
    """The dotted name of the last linear layer of ``model`` (a compiled ``nn.Linear`` in a
    TorchScript model, scripted or traced), or None if there is none.

    The package's single rule (``find_last_linear``): without a forward pass to watch, and
    always for TorchScript, whose compiled layers take no hooks, the last linear layer in
    ``named_modules()`` order.
    """
    try:
        name, _ = find_last_linear(model, None)
    except ValueError:
        return None
    return name or None


def expose_final_layer(
    model: nn.Module,
    final_layer: str | None = None,
    *,
    layer: str | None = None,
    example: Tensor | None = None,
    option: str = "final_layer",
) -> nn.Module:
    r"""A TorchScript model whose final linear layer GradTrust can read.

    GradTrust needs the final ``nn.Linear`` (its input and its weight, through a hook); in a
    TorchScript model it is compiled. The wrapper (a :class:`TorchScriptLayerModel`) runs an
    eager ``nn.Linear`` sharing the compiled layer's weight and bias in its place, and, when
    ``layer`` is given, also exposes that layer through ``wrapper.tap``.

    For the module of a ``torch.export`` program it is the wrapper of
    :func:`captum_ext.exported.expose_exported_final_layer` (with ``layer``,
    :func:`captum_ext.exported.expose_exported_layer`'s).

    Args:
        model (torch.jit.ScriptModule): a scripted or traced model, or the module of a
            ``torch.export`` program.
        final_layer (str, optional): dotted name of its final linear layer. Default: None
            (the last linear layer in ``model.named_modules()``; for an exported model the
            last one that runs).
        layer (str, optional): a layer to expose as well (as :func:`expose_layer`).
        example (Tensor, optional): a small batch; the wrapper must reproduce the model's
            output on it.
        option (str): the name of the argument giving ``final_layer``, for error messages
            (the command line passes ``"--final-layer"``). Default: ``"final_layer"``.

    Raises:
        ValueError: no linear layer is found or named, or the model's code on the way to it
            cannot be evaluated (the message names ``option``).
    """
    from .exported import _exposed, is_exported

    if is_exported(model):  # a torch.export program's module: its layers are graph operators
        return _exposed(model, layer, example, final_layer, option=option)
    modules = dict(model.named_modules())
    if layer is not None:
        _check_layer_name(model, layer)
    if final_layer is None:
        final_layer = last_linear_name(model)
        if final_layer is None:
            kind = getattr(model, "original_name", type(model).__name__)
            raise ValueError(
                f"the TorchScript model {kind} has no linear layer GradTrust could take as the "
                f"final layer; pass `{option}`=NAME (the dotted name of the linear layer "
                "that produces the logits), or load the model as 'package.module:factory'."
            )
    else:
        _check_layer_name(model, final_layer, option=option)
    if not is_linear(modules[final_layer]):
        raise ValueError(
            f"`{option}`={final_layer!r} is a {getattr(modules[final_layer], 'original_name', '')}"
            " module; GradTrust on a TorchScript model needs the linear layer that produces the "
            "logits."
        )
    wrapper = TorchScriptLayerModel(model, layer, head=final_layer)
    if example is not None:
        _check_wrapper(wrapper, model, example, argument=option, name=final_layer)
    return wrapper


def _check_layer_name(model: nn.Module, layer: str, *, option: str = "layer") -> None:
    """Refuse a ``layer`` that names no module of the TorchScript ``model`` (the closest
    names listed; the argument is called ``option``)."""
    if not isinstance(layer, str):
        raise TypeError(
            f"`{option}` must be given by its dotted name for a TorchScript model, got "
            f"{type(layer).__name__}."
        )
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        names = [n for n in modules if n]
        close = difflib.get_close_matches(layer, names, n=_LIST_AT_MOST, cutoff=0.4)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"`{option}`={layer!r} is not a module of the TorchScript model.{hint} Use a name "
            "from model.named_modules()."
        )


def expose_layer(
    model: nn.Module,
    layer: str | nn.Module,
    example: Tensor | None = None,
    *,
    final_layer: str | None = None,
) -> tuple[nn.Module, nn.Module]:
    r"""The model to explain and the layer module to give to a Captum layer method.

    For an eager model this is ``(model, resolve_layer(model, layer))``. For a TorchScript
    model (whose submodules cannot carry hooks) it is ``(wrapper, wrapper.tap)``: a
    :class:`TorchScriptLayerModel` that computes the same output and passes the layer's output
    through an identity module. For the module of a ``torch.export`` program it is the same
    pair from :func:`captum_ext.exported.expose_exported_layer`.

    Args:
        model (nn.Module): an eager or TorchScript model.
        layer (str or nn.Module): the dotted name of the layer (``model.named_modules()``), or
            for eager models the module itself.
        example (Tensor, optional): a small input batch; for TorchScript models the wrapper is
            run on it and checked against the compiled model. Default: None (no check).
        final_layer (str, optional): TorchScript and exported models only: the dotted name
            of the final linear layer to expose as well, so that GradTrust can read it (the
            wrapper of :func:`~captum_ext.torchscript.expose_final_layer`, with ``layer`` as
            its ``tap``; for an exported model that of
            :func:`captum_ext.exported.expose_exported_layer`, which checks it names a linear
            layer). Default: None (only ``layer`` is exposed; an exported model's last linear
            layer is exposed as well when it can be).

    Returns:
        tuple[nn.Module, nn.Module]: the forward function and the layer module.

    Raises:
        ValueError: no module has that name (closest names are listed), or the TorchScript
            code on the way to the layer uses something the wrapper cannot evaluate, or does
            not reproduce the compiled model's output on ``example``.

    Examples::

        >>> from captum_ext.attr import ContrastCAM
        >>> from captum_ext.data import load_model
        >>> from captum_ext.torchscript import expose_layer
        >>> torch.jit.script(model).save("model.ts")  # the bundled digit model, compiled
        >>> scripted = load_model("model.ts")
        >>> forward, layer = expose_layer(scripted, "features.7", example=images[:2])
        >>> maps = ContrastCAM(forward, layer).attribute(images[:4])
        >>> maps.shape
        torch.Size([4, 1, 7, 7])
        >>> eager_maps = ContrastCAM(model, model.features[7]).attribute(images[:4])
        >>> torch.allclose(maps, eager_maps, atol=1e-5)  # same maps as the eager model
        True
        >>> expose_layer(model, "features.7") == (model, model.features[7])  # eager: as is
        True
    """
    from .exported import expose_exported_layer, is_exported

    if is_exported(model) and isinstance(layer, str):  # a torch.export program's module
        return expose_exported_layer(model, layer, example, final_layer=final_layer)
    if not isinstance(model, torch.jit.ScriptModule):
        return model, resolve_layer(model, layer)
    _check_layer_name(model, layer)
    if final_layer is not None:
        wrapper = expose_final_layer(model, final_layer, layer=layer, example=example)
        return wrapper, wrapper.tap
    wrapper = TorchScriptLayerModel(model, layer)
    if example is not None:
        _check_wrapper(wrapper, model, example)
    return wrapper, wrapper.tap


def _check_wrapper(
    wrapper: TorchScriptLayerModel,
    model: nn.Module,
    example: Tensor,
    *,
    argument: str = "layer",
    name: str | None = None,
) -> None:
    fallback = EAGER_FALLBACK
    name = wrapper.layer_name if name is None else name
    with torch.no_grad():
        try:
            got = wrapper(example)
        except _TorchScriptUnsupported as error:
            raise ValueError(f"`{argument}`={name!r}: {error}. {fallback}") from None
        except RuntimeError as error:  # a compiled submodule refused what the interpreter gave
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise ValueError(
                f"`{argument}`={name!r}: evaluating the TorchScript model around this layer "
                f"failed ({first}). {fallback}"
            ) from None
        expected = model(example)
    if not same_model_output(got, expected):
        raise ValueError(
            f"`{argument}`={name!r}: evaluating the TorchScript model around this "
            f"layer did not reproduce its output. {fallback}"
        )
