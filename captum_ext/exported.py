r"""Explaining a layer inside a model saved with ``torch.export`` (a ``.pt2`` archive).

``torch.export.load(path).module()`` is an fx ``GraphModule`` in which the model's layers no
longer exist as modules: every operator is a graph node, tagged with the path of the module
it came from (its ``nn_module_stack``), and the parameters hang on bare containers. Hooks have
nothing to attach to. :func:`expose_exported_layer` returns a copy of the graph (sharing the
parameters) in which

- the output of the named layer (the last node tagged with its path) passes through
  ``.tap``, an identity module that Captum's layer methods can hook, and
- the final linear operator is computed by ``.final_linear``, an ``nn.Linear`` holding the
  same parameter objects, which GradTrust and the other final-layer scores can hook.

:func:`load_exported` reads the archive into a ``GraphModule`` that accepts ``.eval()`` (the
module ``torch.export`` returns refuses it; the mode was fixed when the program was exported).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._utils.layers import EAGER_FALLBACK, LayerTap, is_exported
from ._utils.validation import same_model_output

__all__ = [
    "FixedBatchError",
    "exported_conv_layers",
    "exported_input_shape",
    "exported_layer_names",
    "exported_module_types",
    "expose_exported_final_layer",
    "expose_exported_layer",
    "fixed_batch_size",
    "is_exported",
    "load_exported",
]

_LIST_AT_MOST = 5


def _is_linear(class_name: str) -> bool:
    return class_name == "Linear"  # not MultiheadAttention's NonDynamicallyQuantizableLinear


def _paths(node: torch.fx.Node) -> list[tuple[str, str]]:
    """``(module path, module type)`` of every module the node ran inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path, kind = value[0], value[1]
        paths.append((path, kind if isinstance(kind, str) else getattr(kind, "__name__", "")))
    return paths


def _module_types(graph: torch.fx.Graph) -> dict[str, str]:
    types: dict[str, str] = {}
    for node in graph.nodes:
        for path, module_type in _paths(node):
            types.setdefault(path, module_type.rsplit(".", 1)[-1])
    return types


def exported_module_types(model: torch.fx.GraphModule) -> dict[str, str]:
    """The class name of every module of an exported model that ran, by module path, in the
    order they first run; ``""`` is the model itself (e.g. ``{"": "ResNet", "conv1":
    "Conv2d", ...}``), as ``torch.export`` recorded them in each node's module stack."""
    return _module_types(model.graph)


def _layer_paths(graph: torch.fx.Graph, accept: Callable[[str], bool] | None = None) -> list[str]:
    """The paths of the layers that ran, in order (those whose class name ``accept`` takes)."""
    return [
        path
        for path, name in _module_types(graph).items()
        if path and (accept is None or accept(name))  # path "": the model itself
    ]


def exported_layer_names(model: torch.fx.GraphModule) -> list[str]:
    """The paths of the layers of an exported model, in the order they first run."""
    return _layer_paths(model.graph)


def exported_conv_layers(model: torch.fx.GraphModule) -> list[str]:
    """The paths of the convolutional layers of an exported model, in the order they run."""
    return _layer_paths(model.graph, lambda name: "Conv" in name)


class FixedBatchError(ValueError):
    """A ``torch.export`` program specialised to one batch size (:func:`load_exported`)."""


def exported_input_shape(model: torch.fx.GraphModule) -> tuple[int | None, ...] | None:
    """The shape of an exported model's first input as the program fixed it: a number where
    the size was fixed when it was exported (the program refuses any other), None where the
    dimension is dynamic; None when the program records no input shape."""
    for node in model.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), Tensor):
            return tuple(
                int(size) if isinstance(size, int) else None for size in node.meta["val"].shape
            )
    return None


def fixed_batch_size(model: torch.fx.GraphModule) -> int | None:
    """The batch size an exported model was specialised to (its first input's first dimension
    is a number, not a symbol: the program refuses any other batch size), or None when that
    dimension is dynamic."""
    shape = exported_input_shape(model)
    return shape[0] if shape else None


def load_exported(
    path: str | os.PathLike, device: Any = "cpu", *, fixed_batch: bool = False
) -> torch.fx.GraphModule:
    """The module of the ``torch.export`` program saved at ``path`` (``torch.export.save``), on
    ``device``, as a plain ``GraphModule`` (same graph and parameters) that takes ``.eval()``
    and ``.train()`` without effect: the program's mode was fixed when it was exported.

    A program exported with a fixed batch size refuses every other batch ("Guard failed:
    x.size()[0] == 2"), and the methods run batches of their own size (a chunk of classes,
    noisy copies, one image at a time): it is refused here, naming the fix, unless
    ``fixed_batch=True``.

    Raises:
        FixedBatchError: (a ``ValueError``) the program has a fixed batch size and
            ``fixed_batch`` is False.
    """
    program = torch.export.load(os.fspath(path))
    module = program.module()
    plain = torch.fx.GraphModule(module, module.graph)
    size = fixed_batch_size(plain)
    if size is not None and not fixed_batch:
        raise FixedBatchError(
            f"the torch.export program in {os.fspath(path)!r} was exported with a fixed batch "
            f"size of {size}, and the methods call it with batches of other sizes. Export it "
            "with a dynamic batch dimension: torch.export.export(model, (example,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},)); or, where every call will have "
            "that size, load_exported(path, fixed_batch=True)."
        )
    return plain.to(device)


#: the operators a decomposed ``aten.linear`` becomes (``run_decompositions``)
_DECOMPOSED_LINEAR = ("addmm", "mm", "bmm", "matmul")


def _operator_name(node: torch.fx.Node) -> str:
    """``"addmm"`` for ``aten.addmm.default``: the operator's name without its overload."""
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def _linear_calls(graph: torch.fx.Graph, path: str) -> list[torch.fx.Node]:
    """The ``aten.linear`` calls that ran inside the module at ``path``."""
    return [
        node
        for node in graph.nodes
        if node.op == "call_function"
        and "linear" in str(node.target)
        and any(p == path for p, _ in _paths(node))
    ]


def _decomposed_into(graph: torch.fx.Graph, path: str) -> list[str]:
    """The matrix-product operators a decomposed program runs for the linear layer at
    ``path`` (``["addmm"]`` after ``run_decompositions()``); empty when it is not one."""
    if _linear_calls(graph, path):
        return []
    return sorted(
        {
            _operator_name(node)
            for node in graph.nodes
            if node.op == "call_function"
            and _operator_name(node) in _DECOMPOSED_LINEAR
            and any(p == path for p, _ in _paths(node))
        }
    )


def _final_linear_nodes(
    graph: torch.fx.Graph, path: str | None = None
) -> tuple[str, list[torch.fx.Node]] | None:
    """The path and ``aten.linear`` node of the ``nn.Linear`` at ``path`` (default: the last
    one that ran), when it is one call on two (or three) parameters; else None."""
    linears = _layer_paths(graph, _is_linear)
    last = path if path is not None else (linears[-1] if linears else None)
    if last is None or last not in linears:
        return None
    calls = _linear_calls(graph, last)
    if len(calls) != 1 or len(calls[0].args) < 2:
        return None
    return last, calls


def _no_final_linear(
    graph: torch.fx.Graph, final_layer: str | None, option: str = "final_layer"
) -> ValueError:
    """Why no final linear operator can be exposed (``final_layer``, or the last linear layer
    when None), as the error to raise, naming the argument ``option``."""
    linears = _layer_paths(graph, _is_linear)
    named = f"`{option}`={final_layer!r}" if final_layer is not None else ""
    if final_layer is None and not linears:
        return ValueError(
            "the exported model ran no linear layer (nn.Linear) that GradTrust could take as "
            "the final layer: the scores that read the final layer need the linear layer "
            "that produces the logits."
        )
    path = final_layer if final_layer is not None else linears[-1]
    layers = _layer_paths(graph)
    if path not in layers:
        close = difflib.get_close_matches(path, layers, n=_LIST_AT_MOST, cutoff=0.4)
        hint = f" Closest layers: {', '.join(close)}." if close else ""
        return ValueError(
            f"{named} is not a layer of the exported model.{hint} Layer names are those of "
            "the model it was exported from (captum_ext.exported.exported_layer_names lists "
            f"them); its linear layers: {', '.join(linears) or 'none'}."
        )
    if path not in linears:
        return ValueError(
            f"{named} is not a linear layer of the exported model (its linear layers: "
            f"{', '.join(linears) or 'none'})."
        )
    decomposed = _decomposed_into(graph, path)
    which = named or f"the last linear layer {path!r}"
    if decomposed:
        return ValueError(
            f"{which}: the exported program was decomposed (ExportedProgram."
            "run_decompositions(), as for ExecuTorch or AOTInductor), and this linear layer "
            f"runs as {', '.join('aten.' + op for op in decomposed)} operators, not as one "
            "linear operator that can be exposed as the final layer. Explain the program as "
            "torch.export.export returns it, before run_decompositions()."
        )
    calls = len(_linear_calls(graph, path))
    return ValueError(
        f"{which} does not run as one linear operator in the exported model ("
        f"{f'it runs {calls} times' if calls else 'no aten.linear operator ran inside it'}), "
        f"so it cannot be exposed as the final layer (its linear layers: {', '.join(linears)})."
    )


def _parameter(model: torch.fx.GraphModule, node: Any) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, or None."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    try:
        return model.get_parameter(node.target)
    except AttributeError:
        return None


def expose_exported_layer(
    model: torch.fx.GraphModule,
    layer: str,
    example: Tensor | None = None,
    *,
    final_layer: str | None = None,
) -> tuple[torch.fx.GraphModule, nn.Module]:
    """``(wrapper, wrapper.tap)``: a copy of an exported model's graph (sharing its parameters)
    whose ``layer`` output runs through the identity module ``tap`` and whose final linear
    operator runs as the ``nn.Linear`` ``final_linear`` (same parameter objects), so that
    layer methods and the final-layer trust scores can hook them.

    Args:
        model (GraphModule): the module of a ``torch.export`` program (:func:`load_exported`).
        layer (str): the path of the layer, as in the exported model's source
            (``"layer4"``, ``"features.7"``): :func:`exported_layer_names` lists them.
        example (Tensor, optional): a small input batch; the wrapper must reproduce the
            model's output on it.
        final_layer (str, optional): the path of the linear layer that produces the logits.
            Default: None (the last linear layer that runs, when it runs as one linear
            operator on parameters; else no ``final_linear``).

    Raises:
        ValueError: no operator of the graph ran inside ``layer`` (the closest paths are
            listed), ``final_layer`` is not one of its linear layers or does not run as one
            linear operator (a program decomposed by ``run_decompositions()`` runs it as
            ``aten.addmm``: explain the program before decomposing it), or the wrapper does
            not reproduce the model's output on ``example``.

    Examples::

        >>> import torch
        >>> from captum_ext.attr import GradCAM
        >>> from captum_ext.exported import expose_exported_layer, load_exported
        >>> batch = torch.export.Dim("batch")  # a dynamic batch size (see load_exported)
        >>> program = torch.export.export(  # the bundled digit model
        ...     model, (images[:2],), dynamic_shapes=({0: batch},)
        ... )
        >>> torch.export.save(program, "model.pt2")
        >>> exported = load_exported("model.pt2")
        >>> wrapper, tap = expose_exported_layer(exported, "features.7", example=images[:2])
        >>> maps = GradCAM(wrapper, tap).attribute(images[:2], target=[0, 1])
        >>> torch.equal(maps, GradCAM(model, "features.7").attribute(images[:2], target=[0, 1]))
        True
    """
    wrapper = _exposed(model, layer, example, final_layer)
    return wrapper, wrapper.tap


def expose_exported_final_layer(
    model: torch.fx.GraphModule,
    example: Tensor | None = None,
    *,
    final_layer: str | None = None,
) -> torch.fx.GraphModule:
    """A copy of an exported model's graph (sharing its parameters) whose final linear
    operator runs as the ``nn.Linear`` ``final_linear`` (same parameter objects), for GradTrust
    and the other scores that hook the final layer; :func:`expose_exported_layer` without a
    layer to tap. ``example`` and ``final_layer``: as there.

    Raises:
        ValueError: the model runs no linear layer, ``final_layer`` is not one of its linear
            layers, or the final linear layer does not run as one linear operator on
            parameters (a program decomposed by ``run_decompositions()`` runs it as
            ``aten.addmm``: explain the program before decomposing it); or as
            :func:`expose_exported_layer`.
    """
    return _exposed(model, None, example, final_layer)


def _exposed(
    model: torch.fx.GraphModule,
    layer: str | None,
    example: Tensor | None,
    final_layer: str | None = None,
    *,
    option: str = "final_layer",
) -> torch.fx.GraphModule:
    """The wrapper of :func:`expose_exported_layer` (``layer`` None: no tap); errors about
    ``final_layer`` name the argument ``option`` (``"--final-layer"`` from the command
    line's :func:`captum_ext.torchscript.expose_final_layer`)."""
    if not is_exported(model):
        raise TypeError(
            "`model` must be the module of a torch.export program (torch.export.load(path)"
            f".module(), or load_exported(path)), got {type(model).__name__}."
        )
    graph = copy.deepcopy(model.graph)
    wrapper = torch.fx.GraphModule(model, graph)
    if layer is not None:
        _insert_tap(model, wrapper, graph, layer)
    final = _final_linear_nodes(graph, final_layer)
    if final is None and (final_layer is not None or layer is None):
        # named, or asked for alone (expose_exported_final_layer): a wrapper without
        # final_linear would only send GradTrust back here
        raise _no_final_linear(graph, final_layer, option)
    if final is not None:
        path, (call,) = final
        weight = _parameter(model, call.args[1])
        has_bias = len(call.args) > 2 and call.args[2] is not None
        bias = _parameter(model, call.args[2]) if has_bias else None
        if weight is None or weight.dim() != 2 or (has_bias and bias is None):
            if final_layer is not None or layer is None:
                which = (
                    f"`{option}`={final_layer!r}"
                    if final_layer is not None
                    else f"the last linear layer {path!r}"
                )
                raise ValueError(
                    f"{which}: the weight or bias of this linear layer is not a parameter of "
                    "the exported model (a constant, or computed in the graph), so it cannot be "
                    "exposed as the final layer."
                )
        else:
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            linear.weight = weight  # the same Parameter objects: no copy, one set of values
            if bias is not None:
                linear.bias = bias
            wrapper.add_submodule("final_linear", linear)
            with graph.inserting_after(call):
                replaced = graph.call_module("final_linear", (call.args[0],))
            call.replace_all_uses_with(replaced)
            graph.erase_node(call)
    graph.eliminate_dead_code()
    graph.lint()
    wrapper.recompile()
    if example is not None:
        with torch.no_grad():
            expected, got = model(example), wrapper(example)
        if not same_model_output(got, expected):  # a dict of a segmentation model too
            exposed = f"`layer`={layer!r}" if layer is not None else "the final layer"
            raise ValueError(
                f"{exposed}: the exported model with its layer exposed did not "
                f"reproduce the model's output. {EAGER_FALLBACK}"
            )
    return wrapper


def _insert_tap(
    model: torch.fx.GraphModule, wrapper: torch.fx.GraphModule, graph: torch.fx.Graph, layer: str
) -> None:
    """Route the output of ``layer`` (its last node) through ``wrapper.tap``."""
    inside = [n for n in graph.nodes if any(p == layer for p, _ in _paths(n))]
    if not inside:
        names = exported_layer_names(model)
        close = difflib.get_close_matches(layer, names, n=_LIST_AT_MOST, cutoff=0.4)
        hint = f" Closest layers: {', '.join(close)}." if close else ""
        raise ValueError(
            f"`layer`={layer!r}: no operator of the exported model ran inside a layer of "
            f"that name.{hint} Layer names are those of the model it was exported from "
            "(captum_ext.exported.exported_layer_names lists them)."
        )
    wrapper.add_submodule("tap", LayerTap(layer))
    last, members = inside[-1], set(inside)
    with graph.inserting_after(last):
        tapped = graph.call_module("tap", (last,))
    for user in list(last.users):
        if user is not tapped and user not in members:
            user.replace_input_with(last, tapped)
