"""Finding the layer a method explains, given as a module or a dotted name."""

from __future__ import annotations

import contextlib
import difflib
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .caller import uncompiled
from .hooks import call_hook, registered_hooks

_COMPILED_PREFIX = "_orig_mod."


def compiled_code_runs_eagerly() -> contextlib.AbstractContextManager:
    """``torch.compiler.set_stance("force_eager")`` (torch >= 2.6; a no-op before): compiled
    code called in the block runs eagerly, so hooks and ``vmap`` see the eager modules."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


_PARALLEL_PREFIX = "module."


def eager_name(name: str, modules: dict[str, nn.Module]) -> str:
    """``name`` without the ``_orig_mod.`` prefixes that ``torch.compile(model)`` puts in
    front of its module names, or the ``module.`` of ``nn.DataParallel`` /
    ``DistributedDataParallel``, where ``modules`` (the eager, unwrapped model's) lacks the
    full name."""
    while name not in modules:
        for prefix in (_COMPILED_PREFIX, _PARALLEL_PREFIX):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        else:
            break
    return name


def unwrap_distributed(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (and inside
    ``torch.compile``'s wrapper, whose module names carry an ``_orig_mod.`` prefix): the
    model whose module names the user knows."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    module = uncompiled(module)
    while isinstance(module, DataParallel | DistributedDataParallel):
        module = uncompiled(module.module)
    return module


def user_model(module: nn.Module) -> nn.Module:
    """The model whose module names the user knows, for looking up and reporting layers by
    name: :func:`unwrap_distributed`, and inside a wrapper of ours that holds the user's
    model (:class:`~captum_ext.attr.ContrastiveForward`, whose own names would carry a
    ``forward_func.`` prefix). A wrapper says what it holds with a
    ``_captum_ext_user_model()`` method (None: a plain function, no model to name)."""
    module = unwrap_distributed(module)
    while True:
        held_by = getattr(type(module), "_captum_ext_user_model", None)
        inner = held_by(module) if callable(held_by) else None
        if not isinstance(inner, nn.Module) or inner is module:
            return module
        module = unwrap_distributed(inner)


def root_module(forward_func) -> nn.Module | None:
    """The eager ``nn.Module`` behind ``forward_func``: itself (``torch.compile``'s original
    module for a compiled one), or the owner of a bound method."""
    if isinstance(forward_func, nn.Module):
        return uncompiled(forward_func)
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return uncompiled(owner)
    return None


#: the way out when a compiled (TorchScript or exported) model cannot be evaluated around a
#: layer, in errors of :mod:`captum_ext.torchscript` and :mod:`captum_ext.exported`
EAGER_FALLBACK = (
    "Explain the eager model instead (with captum-ext report: give it as "
    "'package.module:factory' with --weights)."
)


def resolve_layer(forward_func, layer, *, argument: str = "layer") -> nn.Module:
    """Return the module named by ``layer``.

    Args:
        forward_func: the model (or a bound ``forward`` of a model) that owns the layer.
        layer (nn.Module or str): the module itself, or its dotted name in
            ``model.named_modules()`` such as ``"layer4.1.conv2"``.
        argument: the argument name used in error messages.

    Raises:
        TypeError: ``layer`` is neither a module nor a string, or is a TorchScript module
            (forward hooks cannot be registered on ScriptModules).
        ValueError: no module has that name; the message lists the closest names.
    """
    if isinstance(layer, str):
        model = root_module(forward_func)
        if model is None:
            raise TypeError(
                f"`{argument}` was given as the name {layer!r}, but forward_func is not an "
                "nn.Module (nor a bound method of one), so names cannot be looked up; "
                "pass the module itself."
            )
        # names as in the model the user built: inside DataParallel ("features.3" or
        # "module.features.3"), torch.compile's wrappers and ContrastiveForward (whose own
        # names, "forward_func.features.3", are still found)
        modules = dict(user_model(model).named_modules())
        name = eager_name(layer, modules)
        if name not in modules:
            wrapper = dict(unwrap_distributed(model).named_modules())
            if eager_name(layer, wrapper) in wrapper:
                modules, name = wrapper, eager_name(layer, wrapper)
        if name not in modules and is_exported(model):
            raise _exported_layer_error(model, name, argument)
        if name not in modules:
            names = [name for name in modules if name]
            close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"`{argument}`={layer!r} is not a module of {type(model).__name__}.{hint} "
                "Use a name from model.named_modules()."
            )
        layer = modules[name]
    if not isinstance(layer, nn.Module):
        raise TypeError(
            f"`{argument}` must be an nn.Module or a dotted module name, got "
            f"{type(layer).__name__}."
        )
    if isinstance(layer, torch.jit.ScriptModule):
        raise TypeError(
            f"`{argument}` is a TorchScript module ({type(layer).__name__}); forward hooks "
            "cannot be registered on ScriptModules. Explain an eager model (later parts of "
            "it may be scripted), or wrap a loaded TorchScript model with "
            "captum_ext.data.expose_layer(model, 'layer.name')."
        )
    _check_not_an_exported_holder(root_module(forward_func), layer, argument)
    return layer


def _exported_layer_error(model: nn.Module, name: str, argument: str) -> ValueError:
    """The error for a layer name of a ``torch.export`` program: its layers are operators of
    the graph, reached through :func:`captum_ext.exported.expose_exported_layer`."""
    from captum_ext.exported import exported_layer_names

    paths = exported_layer_names(model)
    if name in paths:
        where = f"{name!r} is a layer of the program, run as graph operators, not a module"
    else:
        close = difflib.get_close_matches(name, paths, n=5, cutoff=0.4)
        hint = f" (closest layer paths: {', '.join(close)})" if close else ""
        where = f"{name!r} is not a layer path of the program{hint}"
    return ValueError(
        f"`{argument}`={name!r}: {where}. The layers of a torch.export program run as graph "
        "operators, which no hook reaches. Wrap the program with "
        f"captum_ext.exported.expose_exported_layer(model, {name!r}) and explain the returned "
        "(model, layer) pair; for GradTrust's final layer, "
        "captum_ext.exported.expose_exported_final_layer(model)."
    )


def _check_not_an_exported_holder(model: nn.Module | None, layer: nn.Module, argument: str):
    """Refuse a submodule of a ``torch.export`` program that the graph never calls: the
    program keeps the original module paths as holders of the parameters, but runs every
    layer as graph operators, so a hook on the holder never fires."""
    if model is None or not is_exported(model):
        return
    called = {node.target for node in model.graph.nodes if node.op == "call_module"}
    for name, module in model.named_modules():
        if module is layer and name and name not in called:
            raise ValueError(
                f"`{argument}`={name!r} names a module of a torch.export program, where it only "
                "holds the parameters: the graph runs the layer as operators, so no hook on "
                "the module ever fires. Wrap the program with "
                f"captum_ext.exported.expose_exported_layer(model, {name!r}) and explain the "
                "returned (model, layer) pair; for GradTrust's final layer, "
                "captum_ext.exported.expose_exported_final_layer(model)."
            )


def _called_modules(model: nn.Module, run) -> list[tuple[str, nn.Module, tuple]]:
    """Run ``run()`` with hooks on every module: (name, module, output shape) by completion
    order, only modules called exactly once whose output is one tensor."""
    calls: dict[int, int] = {}
    order: list[tuple[str, nn.Module, tuple]] = []
    names = {id(m): name for name, m in model.named_modules() if name}

    def hook(module, inputs, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        if isinstance(output, torch.Tensor):
            order.append((names[id(module)], module, tuple(output.shape)))

    registrations = [
        call_hook(m, hook)
        for m in model.modules()
        if id(m) in names and not isinstance(m, torch.jit.ScriptModule)
    ]
    # compiled_code_runs_eagerly: hooks on a compiled model's layers
    with registered_hooks(*registrations), compiled_code_runs_eagerly():
        run()
    return [entry for entry in order if calls[id(entry[1])] == 1]


def spatial_layer_suggestions(model: nn.Module, run, before: nn.Module, n: int = 3) -> list[str]:
    """Names of the layers closest before ``before`` (in execution order) whose output has
    spatial dimensions larger than 1 x 1 (``N x K x h x w``, or tokens ``(N, T, D)``) and
    reaches the output: the two that finish last (often the enclosing blocks) and the last
    convolution among them. See :func:`spatial_layer_candidates`, which gives their output
    shapes too."""
    return [name for name, _ in spatial_layer_candidates(model, run, before, n)]


def spatial_layer_candidates(
    model: nn.Module, run, before: nn.Module, n: int = 3
) -> list[tuple[str, tuple]]:
    """``(name, output shape)`` of the layers :func:`spatial_layer_suggestions` names.

    A layer whose activations do not reach the output is left out: a fixed random
    projection of ``run()``'s output (:func:`random_projection_score`) has an exactly zero
    gradient there, so every gradient map of it would be zero. For a token layer
    ``(N, T, D)`` whose T tokens are 0-2 leading tokens and a square grid (a vision
    transformer's) the patch tokens are what must reach it: after a ViT's last block only
    the class token is read, so its output, the final norm and the encoder are left out
    and the last block's first norm (``ln_1``, ``norm1``) is suggested.

    ``run()`` performs one forward pass of ``model`` and returns its output (the caller
    keeps the model's state); it runs twice, once under ``torch.no_grad`` for the shapes and
    once with gradients for the check (skipped where the output is not a floating-point
    tensor: then no layer is left out).
    """
    with torch.no_grad():
        order = _called_modules(model, run)
    stop = next((i for i, entry in enumerate(order) if entry[1] is before), len(order))
    spatial = [
        (name, module, shape)
        for name, module, shape in order[:stop]
        if len(shape) >= 3 and any(s > 1 for s in shape[2:])
    ][::-1]
    if spatial:
        blind = _modules_not_reaching_output(model, run, [module for _, module, _ in spatial])
        spatial = [entry for entry in spatial if id(entry[1]) not in blind]
    picked = [entry for entry in spatial[: max(0, n - 1)]]
    conv = next((entry for entry in spatial if isinstance(entry[1], nn.modules.conv._ConvNd)), None)
    if conv is not None and conv not in picked:
        picked.append(conv)
    for entry in spatial:
        if len(picked) >= n:
            break
        if entry not in picked:
            picked.append(entry)
    return [(name, shape) for name, _, shape in picked]


def random_projection_score(output: torch.Tensor) -> torch.Tensor:
    """``sum(output * r)`` with ``r ~ N(0, I)`` drawn from seed 0: one scalar whose gradient
    is non-zero wherever the output depends on a tensor (the sum of a softmax output is
    constant, a random projection of it is not)."""
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    return (output * projection.to(output.device)).sum()


def _modules_not_reaching_output(model: nn.Module, run, modules: list[nn.Module]) -> set[int]:
    """ids of ``modules`` at whose output (the patch tokens of a token layer) the gradient of
    :func:`random_projection_score` of ``run()`` is exactly zero. Modules whose output takes
    no part in the graph (made from no parameter or input that requires gradients), and all
    of them where the check cannot run, are not named."""
    from captum_ext.token_grid import token_grid_shape

    from .model_state import gradients_on, preserved_state

    outputs: dict[int, torch.Tensor] = {}

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            outputs.setdefault(id(module), output)

    with registered_hooks(*(call_hook(module, hook) for module in modules)):
        try:
            with preserved_state([model]), gradients_on():
                for parameter in model.parameters():
                    if parameter.is_floating_point():
                        parameter.requires_grad_(True)
                with compiled_code_runs_eagerly():
                    result = run()
                if (
                    not isinstance(result, torch.Tensor)
                    or not result.is_floating_point()
                    or not result.requires_grad
                    or not outputs
                ):
                    return set()
                keys = list(outputs)
                grads = torch.autograd.grad(
                    random_projection_score(result),
                    [outputs[key] for key in keys],
                    allow_unused=True,
                )
        except Exception:  # noqa: BLE001 - the check only refines a courtesy suggestion
            return set()
    blind = set()
    for key, grad in zip(keys, grads):
        if grad is not None and grad.dim() == 3:
            grid = token_grid_shape(grad.shape[1])
            if grid is not None:
                grad = grad[:, grid[0] :]
        if grad is None or not bool(grad.ne(0).any()):
            blind.add(key)
    return blind


class LayerTap(nn.Module):
    """Identity placed on a layer's output where the layer itself cannot carry hooks (inside
    a TorchScript or ``torch.export`` model), so that layer methods can hook the tap."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.layer_name = name

    def forward(self, x: Any) -> Any:
        return x

    def extra_repr(self) -> str:
        return f"layer_name={self.layer_name!r}"


#: What ``torch.export`` leaves in place of a layer: a call of a dispatcher operator
#: (``aten.conv2d.default``: an ``OpOverload``, or a higher-order operator such as ``cond``).
_OPERATOR_TYPES: tuple[type, ...] = tuple(
    kind
    for kind in (
        getattr(torch._ops, "OperatorBase", None),
        getattr(torch._ops, "OpOverload", None),
    )
    if isinstance(kind, type)
)


def is_exported(model: Any) -> bool:
    """Whether ``model`` is the module of a ``torch.export`` program: an fx ``GraphModule``
    in which the layers ran as dispatcher operators (``call_function`` nodes of ``aten`` ops
    that carry the module paths they came from, ``nn_module_stack``), not as modules.

    A ``torch.fx.symbolic_trace`` GraphModule is not one: its layers are submodules the graph
    calls (``call_module`` nodes), which take hooks as in the eager model, and its functions
    are the Python ones of the model's code (``torch.flatten``, ``operator.add``), although
    it records ``nn_module_stack`` too (recent torch).
    """
    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(
        node.op == "call_function"
        and isinstance(node.target, _OPERATOR_TYPES)
        and node.meta.get("nn_module_stack")
        for node in model.graph.nodes
    )


def quantized_note(model: nn.Module | None) -> str:
    """A sentence naming the quantized layers of ``model`` (``torch.ao.quantization``'s
    ``quantize_dynamic`` / ``convert``), which pass no gradients: torch has no autograd for
    quantized kernels, so a gradient through them is zero or missing. ``""`` when none."""
    if not isinstance(model, nn.Module):
        return ""
    found, names = [], []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in names)  # its packed params
        if not inside and type(module).__module__.startswith(
            ("torch.ao.nn.quantized", "torch.nn.quantized")
        ):
            names.append(name)
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            found.append(f"{name or 'the model'} ({kind})")
    if not found:
        return ""
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (
        f"The model has quantized layers: {shown}. Quantized kernels pass no gradients (torch "
        "has no autograd for them): explain the floating-point model they were made from."
    )


def is_linear(module) -> bool:
    """An ``nn.Linear``, or a compiled one in a TorchScript model (scripted or traced)."""
    if isinstance(module, nn.Linear):
        return True
    kind = getattr(module, "original_name", None) or type(module).__name__
    weight = getattr(module, "weight", None)  # a plain Tensor in a torch.jit.load-ed model
    return kind == "Linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2


#: GradTrust's advice when no final linear layer is found: it takes any layer with a weight,
#: a final convolution too (SqueezeNet's classifier is a 1 x 1 convolution). ``{here}`` is
#: filled with the model's last layer with a weight to run, where it has no linear layer
FINAL_LAYER_REMEDY = (
    "pass `{argument}` (the module or dotted name of the layer that produces the logits: a "
    "linear layer, or the final convolution of a model without one{here})"
)


def _weighted(module: nn.Module) -> bool:
    """A layer with a weight matrix or kernel of its own (a convolution, a linear layer;
    not a normalisation, whose weight is one number per channel)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


def last_weighted_layer(model: nn.Module, run) -> tuple[str, nn.Module] | None:
    """``(dotted name, module)`` of the layer with a weight (:func:`_weighted`: a
    convolution, a linear layer) that runs last in ``run()`` (one forward pass, run here
    under ``no_grad``; the caller keeps the model's state), or None when there is none, it
    ran more than once, or the pass cannot be watched (``run`` None, a TorchScript model)."""
    if run is None or isinstance(model, torch.jit.ScriptModule):
        return None
    names = {
        id(m): name
        for name, m in model.named_modules()
        if name and _weighted(m) and not isinstance(m, torch.jit.ScriptModule)
    }
    calls: list[nn.Module] = []

    def record(module, args, output):
        calls.append(module)

    with registered_hooks(*(call_hook(m, record) for m in model.modules() if id(m) in names)):
        try:
            with torch.no_grad(), compiled_code_runs_eagerly():
                run()
        except Exception:  # noqa: BLE001 - it only names a layer in an error message
            return None
    if not calls or sum(1 for m in calls if m is calls[-1]) != 1:
        return None
    return names[id(calls[-1])], calls[-1]


def find_last_linear(
    model: nn.Module,
    run=None,
    *,
    argument: str = "layer",
    remedy: str = FINAL_LAYER_REMEDY,
) -> tuple[str, nn.Module]:
    """The final linear layer of ``model``: ``(dotted name, module)``.

    One rule everywhere: the linear layer that runs **last** in a forward pass, found with
    forward hooks while ``run()`` performs one pass (the caller runs it under ``no_grad`` and
    keeps the model's state). It must run once per pass. Forward hooks cannot be put on the
    compiled layers of a TorchScript model, so there (and when ``run`` is None) the last
    linear layer in ``named_modules()`` order is taken, which is the order of execution for
    the sequential heads that scripting and tracing preserve.

    ``remedy`` is the advice of the errors, formatted with ``argument``; where it holds
    ``{here}`` (as the default, GradTrust's, :data:`FINAL_LAYER_REMEDY` does) and the model
    has no linear layer, ``{here}`` names the last layer with a weight that ``run()`` runs
    (:func:`last_weighted_layer`: SqueezeNet's final 1 x 1 convolution, ``classifier.1``).

    Raises:
        ValueError: the model has no linear layer, or none ran, or the last ran more than
            once; the message names ``argument`` and says what to pass instead.
    """
    hint = remedy.format(argument=argument, here="")
    names = {id(m): name for name, m in model.named_modules() if name and is_linear(m)}
    if not names and is_linear(model):
        names = {id(model): ""}
    if not names:
        last = last_weighted_layer(model, run) if "{here}" in remedy else None
        if last is not None:
            kind = type(last[1]).__name__
            here = f"; here {last[0]!r} ({kind}), the last layer with a weight to run"
            hint = remedy.format(argument=argument, here=here)
        quantized = quantized_note(model)
        if is_exported(model):
            quantized = (
                "Its layers are operators of a torch.export graph, not modules: wrap it with "
                "captum_ext.exported.expose_exported_final_layer(model)."
            )
        raise ValueError(
            f"`{argument}`: {type(model).__name__} has no linear layer to take as the final "
            f"layer; {hint}." + (f" {quantized}" if quantized else "")
        )
    modules = {name: m for name, m in model.named_modules() if id(m) in names}
    scripted = isinstance(model, torch.jit.ScriptModule) or any(
        isinstance(m, torch.jit.ScriptModule) for m in modules.values()
    )
    if run is None or scripted:
        name = list(modules)[-1]
        return name, modules[name]
    calls: list[nn.Module] = []

    def record(module, args, output):
        calls.append(module)

    with registered_hooks(*(call_hook(m, record) for m in modules.values())), torch.no_grad():
        run()
    if not calls:
        raise ValueError(
            f"`{argument}`: no linear layer of {type(model).__name__} ran in a forward pass; "
            f"{hint}."
        )
    last = calls[-1]
    if sum(1 for m in calls if m is last) != 1:
        raise ValueError(
            f"`{argument}`: the last linear layer to run ({names[id(last)]}) runs more than once "
            f"per forward pass; {hint}."
        )
    return names[id(last)], last


def owned_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters ``module`` holds itself (not those of its children), with the
    originals of its parametrisations (``module.parametrizations``, which
    ``torch.nn.utils.parametrize`` moves its weights into)."""
    from torch.nn.utils import parametrize

    found = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        ids = {id(p) for p in found}
        found += [p for p in module.parametrizations.parameters() if id(p) not in ids]
    return found


class _FirstParameterUse(TorchFunctionMode):
    """Appends ``(owner, True)`` to ``events`` for each owner in ``owners[id(parameter)]``
    the first time a torch function (an operator, a tensor method, ``F.linear``, an
    exported graph's ``aten`` call) that returns a tensor is given a watched parameter."""

    def __init__(self, owners: dict[int, list[str]], events: list[tuple[str, bool]]) -> None:
        super().__init__()
        self.owners, self.events, self.seen = owners, events, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if len(self.seen) == len(self.owners):  # every watched parameter already seen
            return result
        # computations only: reading a parameter's dtype, device or shape (a model that
        # casts its input to its first layer's dtype) returns no tensor and is no use of it
        if any(isinstance(value, torch.Tensor) for value in tree_leaves(result)):
            for value in tree_leaves((args, kwargs)):
                key = id(value)
                if isinstance(value, torch.Tensor) and key in self.owners and key not in self.seen:
                    self.seen.add(key)
                    self.events.extend((owner, True) for owner in self.owners[key])
        return result


@contextlib.contextmanager
def execution_ranks(modules: dict[str, nn.Module]):
    """Watch the forward pass(es) run in the block: when each of ``modules`` (by name) first
    ran. Yields a dict, filled when the block ends: name -> rank (smaller = earlier). A
    layer (a module without children) ranks by the first call of its ``forward`` (a forward
    pre-hook). A module with children (the model itself, a block holding a class token,
    a positional embedding or a layer scale besides its layers) ranks by the first torch
    function that computes with one of its own :func:`owned_parameters`, where they take
    part in its computation, not where its ``forward`` starts (a vision transformer's
    class token joins after its patch embedding has run; a ConvNeXt block's layer scale
    multiplies its layers' output); where none of them is seen in use (they are used by
    compiled code, or not at all) it ranks where its ``forward`` starts. A module whose
    ``forward`` is never called but whose parameters another uses (``nn.MultiheadAttention``'s
    ``out_proj``, an ``nn.ParameterList``, the parameter holders of a ``torch.export``
    program) ranks by their first use. Modules that never ran are absent, and so are
    TorchScript modules and modules inside them: compiled code takes neither hooks nor
    torch functions. The caller runs the pass(es) (under ``no_grad``, or an explainer's
    own, keeping the model's state); the hooks and the mode are gone afterwards, also on
    error."""
    events: list[tuple[str, bool]] = []  # (name, by a parameter) in the order they happen
    owners: dict[int, list[str]] = {}
    for name, module in modules.items():
        for parameter in owned_parameters(module):
            owners.setdefault(id(parameter), []).append(name)
    by_use_first = {  # its own parameters rank it, not its forward's start
        name
        for name, module in modules.items()
        if any(child != "parametrizations" for child, _ in module.named_children())
    }

    def pre_hook(name: str):
        return lambda module, args: events.append((name, False))

    ranks: dict[str, int] = {}
    registrations = [
        call_hook(module, pre_hook(name), pre=True)
        for name, module in modules.items()
        if not isinstance(module, torch.jit.ScriptModule)
    ]
    with (
        registered_hooks(*registrations),
        compiled_code_runs_eagerly(),
        _FirstParameterUse(owners, events),
    ):
        yield ranks
    by_parameter: dict[str, int] = {}
    by_call: dict[str, int] = {}
    for i, (name, parameter) in enumerate(events):
        (by_parameter if parameter else by_call).setdefault(name, i)
    for name in modules:
        first, second = (by_parameter, by_call) if name in by_use_first else (by_call, by_parameter)
        if name in first:
            ranks[name] = first[name]
        elif name in second:
            ranks[name] = second[name]
