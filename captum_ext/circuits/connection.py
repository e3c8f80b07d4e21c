"""Finding the stages of a network and the modules through which each stage feeds the next.

Private helpers of :class:`captum_ext.circuits.CircuitReadout`.

A *stage* is a module whose output is recorded (a feature map ``N x C x ...`` or a vector
``N x C``); its channels are the candidate nodes of the circuit. The *ingress modules* of a
stage are the convolutions (or linear layers) that consume the previous stage's output and
produce this stage's channels. The connection from the last stage to the classifier's input
(the pooled feature vector) is either a global pooling (identity channel map, "tied"
channels) or a linear layer.

Two ways of reading the model:

- ``torch.fx`` (when ``symbolic_trace`` succeeds): from the node of the previous stage's
  output, follow every consumer through channel-wise operations (normalisation,
  activations, pooling, dropout, flatten); a convolution or linear layer met on the way is an
  ingress module when the next stage's output depends on it; an addition is a residual join
  and is not followed (the identity path is not a weighted connection). A linear ingress
  module must produce the destination's features itself (only channel-wise operations after
  it); two linear layers in a row between stages raise an error naming them. A linear layer
  may read the stage's map flattened (VGG, AlexNet): the readout maps its C x h x w input
  features back to the C channels. When no ingress convolution reaches the destination's
  output without a further convolution, the series of the destination block's own
  convolutions that do (an inverted-residual block: expand, depthwise, project) are recorded
  as ``Connection.paths``; an ingress convolution outside the destination that reaches it
  only through further convolutions means a stage is missing from the list (an error).
- module order (when the model does not trace): the first convolution or linear layer
  registered after the previous stage, plus the ``downsample`` / ``shortcut`` convolution of
  the same block when there is one. The readout checks in its forward pass that the stages
  run in the listed order and these modules between their stages.

Default stages: a single stage that is a container of blocks (MobileNet's ``features``) is
opened, each block a stage, when its blocks connect (otherwise it stays one stage, with a
warning naming the connection that fails).
"""

from __future__ import annotations

import operator
import warnings
from collections import deque
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from captum_ext._utils.layers import find_last_linear, is_exported

#: Normalisations and activations: they act on each channel separately.
_NORMS_AND_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
)
#: Modules that keep channels apart (act on each channel separately or only reshape).
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    *_NORMS_AND_ACTIVATIONS,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
    nn.Upsample,
)
#: Modules a stage feeds through that start a new stage (weights W[d, s] give the edges).
_INGRESS_MODULES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
#: Leaf modules that may follow a convolution inside the same plain stage.
_POST_CONV_MODULES: tuple[type[nn.Module], ...] = (
    *_NORMS_AND_ACTIVATIONS,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
)

_F = torch.nn.functional
_CHANNELWISE_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    _F.relu,
    _F.relu6,
    _F.leaky_relu,
    _F.gelu,
    _F.silu,
    _F.elu,
    _F.hardswish,
    torch.sigmoid,
    torch.tanh,
    _F.sigmoid,
    _F.tanh,
    _F.dropout,
    _F.dropout2d,
    _F.max_pool2d,
    _F.avg_pool2d,
    _F.adaptive_avg_pool2d,
    _F.adaptive_max_pool2d,
    _F.batch_norm,
    torch.flatten,
    torch.squeeze,
    torch.mean,
    torch.amax,
}
_CHANNELWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "mean",
    "amax",
    "contiguous",
    "clone",
    "float",
    "to",
}
#: Shape queries: consumers that produce no tensor (ignored).
_SHAPE_METHODS = {"size", "dim", "numel"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Connection:
    """How stage ``source`` feeds stage ``destination``.

    ``ingress`` holds the dotted names of the convolutions / linear layers in between; an
    empty tuple means the channels are tied one to one (global pooling before the
    classifier). ``method`` is ``"fx"`` or ``"module_order"``. ``paths`` (found with
    ``torch.fx`` only) holds, for a destination block such as an inverted-residual block
    (expand, depthwise, project convolutions), each series of its convolutions from the
    source to the block's output (joined to it at most by the block's residual addition); the
    readout composes them where none of the ingress modules produces the destination's
    channels itself.
    """

    source: str
    destination: str
    ingress: tuple[str, ...]
    method: str
    paths: tuple[tuple[str, ...], ...] = ()


def _is_leaf(module: nn.Module) -> bool:
    """A module without submodules, or one whose only submodule is the ``parametrizations``
    dict that ``torch.nn.utils.parametrize`` adds (``weight_norm``, ``spectral_norm``, ...):
    the parametrizations compute its weights, the module still runs as one layer."""
    children = [name for name, _ in module.named_children()]
    return not children or (
        children == ["parametrizations"] and parametrize.is_parametrized(module)
    )


def _contains_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _called_modules(model: nn.Module) -> set[str] | None:
    """The submodules a ``torch.fx`` GraphModule's graph calls (its ``call_module``
    targets); None for any other model, whose modules run their own ``forward``."""
    if not isinstance(model, fx.GraphModule):
        return None
    return {str(node.target) for node in model.graph.nodes if node.op == "call_module"}


def _is_container_of_blocks(module: nn.Module) -> bool:
    """An ``nn.Sequential`` / ``nn.ModuleList`` of blocks only (no leaf among its children):
    a residual stage such as ResNet's ``layer1`` or RegNet's ``trunk_output.block1``."""
    children = list(module.children())
    return (
        isinstance(module, (nn.Sequential, nn.ModuleList))
        and bool(children)
        and not any(_is_leaf(c) for c in children)
    )


def _holds_stages(module: nn.Module) -> bool:
    """A container whose children are all containers of blocks, at least two of them with a
    convolution (RegNet's ``trunk_output``, holding the stages ``block1`` .. ``block4``):
    one unit would be one stage spanning them all, which no connection from the stem
    resolves. Not ResNet's ``layer1`` (its children are blocks) nor MobileNetV2's
    ``features`` (it holds a convolution's container with leaves and blocks)."""
    children = list(module.children())
    return (
        isinstance(module, (nn.Sequential, nn.ModuleList))
        and all(_is_container_of_blocks(c) for c in children)
        and sum(_contains_conv(c) for c in children) >= 2
    )


def concatenates(model: nn.Module, name: str) -> bool:
    """Whether the traced forward pass of ``model`` concatenates tensors (``torch.cat``)
    inside its module ``name``: branches joined along the channels (ShuffleNetV2's blocks),
    whose channels no single convolution produces. False when the model does not trace."""
    graph = trace(model)
    if graph is None:
        return False
    return any(
        node.op == "call_function" and node.target is torch.cat and _belongs(node, name)
        for node in graph.graph.nodes
    )


def _units(
    module: nn.Module,
    prefix: str = "",
    called: set[str] | None = None,
    classifier: str | None = None,
) -> list[tuple[str, nn.Module]]:
    """The model cut into the units stages are made of, in registration order.

    Leaves are units; an ``nn.Sequential`` / ``nn.ModuleList`` holding at least one leaf is
    opened (a plain stack); a container holding only blocks (``layer1`` of a ResNet) is one
    unit, and so is any other module with its own ``forward`` (a residual block). A
    container holding only such containers of blocks (RegNet's ``trunk_output``, whose
    children ``block1`` .. ``block4`` are its stages) is opened: each of them is a unit. In a
    ``torch.fx`` GraphModule (``symbolic_trace``) only the modules its graph calls run
    (``called``): a container it never calls (``features``, a bare ``nn.Module`` holding
    the layers there) is opened, as no hook on it would fire. A module holding both
    convolutions and the ``classifier`` (the model itself inside a wrapper,
    ``nn.Sequential(normalise, model)``) is opened too: as one unit it would be a stage that
    contains the classifier.
    """
    if called is None and not prefix:
        called = _called_modules(module)
    units: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if _is_leaf(child):
            units.append((full, child))
        elif (
            (called is not None and full not in called)
            or (
                isinstance(child, (nn.Sequential, nn.ModuleList))
                and any(_is_leaf(c) for c in child.children())
            )
            or _holds_stages(child)
            or (
                classifier is not None
                and classifier.startswith(full + ".")
                and _contains_conv(child)
            )
        ):
            units.extend(_units(child, full + ".", called, classifier))
        else:
            units.append((full, child))
    return units


def default_stages(model: nn.Module, classifier: str) -> list[str]:
    """Dotted names of the default stages (see :class:`CircuitReadout` for the rules).

    - a block unit containing a convolution (a residual stage such as ``layer1``) is a stage;
      a container of such stages (RegNet's ``trunk_output``) is opened into them
      (:func:`_units`);
    - a plain convolution's stage ends at its post-activation: the last of the normalisation /
      activation / dropout leaves right after it. When the next stage is a block stage (the
      stem of a ResNet), the stage ends right before that block instead (after the max-pool).
    - a hidden linear layer of the head (VGG's and AlexNet's ``classifier.0`` / ``.3``) is a
      stage ending at its post-activation, except the last one before the classifier: its
      (post-activation) output is the pooled feature vector, the classifier's input.
    - when the only stage is a container of blocks (MobileNetV2's ``features``), its blocks
      are the stages (:func:`_blocks_of`).
    """
    units = [(n, m) for n, m in _units(model, classifier=classifier) if n != classifier]
    # a post-activation module the forward pass calls more than once (one nn.ReLU shared by
    # every convolution) has no single output to read: a stage ends before it
    graph = trace(model)
    if graph is not None:
        calls: dict[str, int] = {}
        for node in graph.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        units = [
            (n, m)
            for n, m in units
            if not (isinstance(m, _POST_CONV_MODULES) and calls.get(n, 0) > 1)
        ]
    # hidden linear layers of the head; the last one produces the pooled features
    hidden = [n for n, m in units if isinstance(m, nn.Linear)]
    linear_stages = set(hidden[:-1])
    stages: list[tuple[str, bool]] = []  # (name, is_block)
    i = 0
    while i < len(units):
        name, module = units[i]
        if name in linear_stages:
            end = i
            while end + 1 < len(units) and isinstance(units[end + 1][1], _POST_CONV_MODULES):
                end += 1
            stages.append((units[end][0], False))
            i = end + 1
            continue
        if not _is_leaf(module) and _contains_conv(module):
            stages.append((name, True))
            i += 1
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            end = i
            while end + 1 < len(units) and isinstance(units[end + 1][1], _POST_CONV_MODULES):
                end += 1
            # a stem feeding a residual stage ends right before it (after its pooling)
            look = end + 1
            while look < len(units) and _is_leaf(units[look][1]):
                if isinstance(units[look][1], nn.modules.conv._ConvNd | nn.Linear):
                    break
                look += 1
            nxt = units[look][1] if look < len(units) else None
            if nxt is not None and not _is_leaf(nxt) and _contains_conv(nxt):
                end = look - 1
            stages.append((units[end][0], False))
            i = end + 1
            continue
        i += 1
    if len(stages) == 1 and stages[0][1]:
        opened = _blocks_of(model, stages[0][0], classifier)
        if opened is not None:
            return opened
    if not stages:
        compiled = any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())
        if compiled or is_exported(model):
            what = (
                "are compiled TorchScript, which takes no hooks"
                if compiled
                else "are operators of a torch.export graph, not modules"
            )
            raise ValueError(
                f"`layers`: found no convolutional stage in {type(model).__name__}; its layers "
                f"{what}: load the eager model (for the command line, --model "
                "'package.module:factory')."
            )
        raise ValueError(
            f"`layers`: found no convolutional stage in {type(model).__name__}; pass the "
            "layers to read out explicitly."
        )
    return [name for name, _ in stages]


def _blocks_of(model: nn.Module, name: str, classifier: str) -> list[str] | None:
    """The blocks of ``name`` as stages, when it is the only stage found and a container
    (``nn.Sequential`` / ``nn.ModuleList``) of blocks (MobileNetV2's ``features``): one stage
    would give a graph of the last block's channels only. None when it holds fewer than two
    blocks with a convolution. When the blocks do not connect as the readout resolves
    connections (:func:`find_connections` with ``strict=True``, then the channel check of
    :func:`_unresolved_channels`), ``[name]`` (the one-stage graph) with a ``UserWarning``
    naming the first connection that fails and why."""
    container = model.get_submodule(name)
    if not isinstance(container, nn.Sequential | nn.ModuleList):
        return None
    blocks = [f"{name}.{child}" for child, m in container.named_children() if _contains_conv(m)]
    if len(blocks) < 2:
        return None
    try:
        connections = find_connections(model, blocks, classifier, strict=True)
    except ValueError as error:
        reason = str(error).split(": ", 1)[-1].split(" Circuits follow", 1)[0]
    else:
        reason = _unresolved_channels(model, connections)
    if reason is None:
        return blocks
    warnings.warn(
        f"`layers`: the only stage found in {type(model).__name__} is {name!r}, a container "
        f"of blocks, and its blocks {blocks} could not be connected as stages: {reason} "
        f"The graph has a single stage, [{name!r}] (its last block's channels only); pass "
        "the blocks as `layers` explicitly to try otherwise.",
        UserWarning,
        stacklevel=4,
    )
    return [name]


def _unresolved_channels(model: nn.Module, connections: list[Connection]) -> str | None:
    """Why the readout would not resolve a block-to-block connection, from the channel
    counts of the modules alone (no forward pass): the destination block's channels are the
    input channels of the next connection's ingress modules (or divide the input features of
    a linear one, which may read the map flattened); the readout needs an ingress module
    producing them, or a series of the destination's convolutions (``Connection.paths``)
    ending in them. None when every connection resolves (or its channels are unknown)."""

    def widths(module: nn.Module) -> tuple[int, int] | None:
        if isinstance(module, nn.Linear):
            return module.in_features, module.out_features
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels, module.out_channels
        return None

    def fits(channels: int, consumers: list[nn.Module]) -> bool:
        return all(
            channels == m.in_channels
            if isinstance(m, nn.modules.conv._ConvNd)
            else m.in_features % channels == 0
            for m in consumers
        )

    for connection, following in zip(connections, connections[1:], strict=False):
        if not connection.ingress:
            continue
        if following.ingress:
            consumers = [model.get_submodule(n) for n in following.ingress]
        else:  # global pooling (or a flatten) straight into the classifier
            consumers = [model.get_submodule(following.destination)]
        consumers = [m for m in consumers if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
        if not consumers:
            continue
        produced = [widths(model.get_submodule(n)) for n in connection.ingress]
        if any(w is not None and fits(w[1], consumers) for w in produced):
            continue
        for path in connection.paths:
            convs = [model.get_submodule(n) for n in path]
            joined = all(a.out_channels == b.in_channels for a, b in zip(convs, convs[1:]))
            if joined and fits(convs[-1].out_channels, consumers):
                break
        else:
            first = consumers[0]
            if isinstance(first, nn.modules.conv._ConvNd):
                channels = f"{first.in_channels} channels"
            else:
                channels = f"channels dividing {first.in_features} features"
            series = " nor does a series of its convolutions" if connection.paths else ""
            return (
                f"from layer {connection.source!r} to layer {connection.destination!r} "
                f"({channels}, as read by the next stage): none of its ingress modules "
                f"{list(connection.ingress)} produces them{series} (a block that "
                "concatenates branches, for instance)."
            )
    return None


def find_classifier(model: nn.Module) -> str:
    """Name of the model's final linear layer (the default classifier), by the package's one
    rule (:func:`captum_ext._utils.layers.find_last_linear`; without a forward pass, the last
    ``nn.Linear`` in ``named_modules()`` order)."""
    name, _ = find_last_linear(
        model,
        None,
        argument="classifier",
        remedy="pass `{argument}`, the final linear layer whose input is the pooled feature vector",
    )
    return name


# --------------------------------------------------------------------------------------
# torch.fx


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``torch.fx.symbolic_trace(model)``, or None when the model does not trace."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use module order
        return None


def _module_path(key: str) -> str:
    return key.split("@", 1)[0]


def _belongs(node: fx.Node, name: str) -> bool:
    if node.op == "call_module" and (node.target == name or node.target.startswith(name + ".")):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(_module_path(key) == name for key in stack)


def _output_node(graph: fx.Graph, model: nn.Module, name: str) -> fx.Node:
    module = model.get_submodule(name)
    if _is_leaf(module):
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    else:
        inside = [n for n in graph.nodes if _belongs(n, name)]
        members = set(inside)
        nodes = [n for n in inside if any(user not in members for user in n.users)]
    if len(nodes) != 1:
        what = "never runs" if not nodes else f"produces {len(nodes)} outputs (or runs twice)"
        raise ValueError(
            f"`layers`: layer {name!r} {what} in the traced forward pass, so its output "
            "cannot be read as one stage; pick a module that runs once."
        )
    return nodes[0]


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _describe(node: fx.Node) -> str:
    target = node.target
    label = getattr(target, "__name__", None) or str(target)
    return f"{node.op} {label}"


def _fx_connection(
    graph: fx.Graph,
    model: nn.Module,
    source: str,
    destination: str,
    classifier: str,
    strict: bool = False,
) -> Connection:
    start = _output_node(graph, model, source)
    if destination == classifier:
        ends = [n for n in graph.nodes if n.op == "call_module" and n.target == classifier]
        if len(ends) != 1:
            raise ValueError(
                f"`classifier` {classifier!r} runs {len(ends)} times in the traced forward "
                "pass; expected exactly once."
            )
        end = ends[0]
    else:
        end = _output_node(graph, model, destination)
    needed = _ancestors(end) | {end}
    ingress: list[str] = []
    reached_classifier = False
    seen = {start}
    todo = deque(start.users)
    while todo:
        node = todo.popleft()
        if node in seen:
            continue
        seen.add(node)
        follow = False
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if node.target == classifier:
                reached_classifier = True
            elif isinstance(module, _INGRESS_MODULES):
                if node in needed:
                    ingress.append(node.target)
            elif isinstance(module, _CHANNELWISE_MODULES):
                follow = True
            elif node in needed:
                what = f"module {node.target!r} ({type(module).__name__})"
                raise _unresolved(source, destination, what)
        elif node.op == "call_function":
            if node.target in _ADD_FUNCTIONS:
                pass  # residual join: the identity path carries no weight
            elif node.target in _CHANNELWISE_FUNCTIONS:
                follow = True
            elif node.target is getattr:
                pass
            elif node in needed:
                raise _unresolved(source, destination, _describe(node))
        elif node.op == "call_method":
            if node.target in _ADD_METHODS or node.target in _SHAPE_METHODS:
                pass
            elif node.target in _CHANNELWISE_METHODS:
                follow = True
            elif node in needed:
                raise _unresolved(source, destination, _describe(node))
        if follow:
            todo.extend(node.users)
    for name in ingress:
        if isinstance(model.get_submodule(name), nn.Linear):
            _check_direct(graph, model, name, end, source, destination, destination == classifier)
    if destination == classifier:
        if ingress and reached_classifier:
            raise _unresolved(
                source, destination, "both a linear layer and a direct path to the classifier"
            )
        if not ingress and not reached_classifier:
            raise _unresolved(source, destination, "no path to the classifier")
    elif not ingress:
        raise _unresolved(source, destination, "no convolution or linear layer in between")
    paths: tuple[tuple[str, ...], ...] = ()
    if ingress and not any(isinstance(model.get_submodule(name), nn.Linear) for name in ingress):
        nodes = [n for n in graph.nodes if n.op == "call_module" and n.target in ingress]
        if not _reaches(nodes, end, model):
            inside = [node for node in nodes if _belongs(node, destination)]
            if not inside:
                # the ingress convolutions feed further convolutions outside the destination
                # before it: a stage in between is missing
                raise _unresolved(
                    source,
                    destination,
                    f"its ingress modules {ingress} reach it only through further "
                    "convolutions outside it, which belong to no listed stage; list every "
                    "convolutional stage in between",
                )
            paths = _chains(inside, end, model, destination)
            if strict and not paths:
                raise _unresolved(
                    source,
                    destination,
                    f"its ingress modules {ingress} reach its output only through further "
                    "convolutions, and no series of its convolutions leads there through "
                    "channel-wise operations (and a final residual addition)",
                )
    return Connection(source, destination, tuple(ingress), "fx", paths)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _reaches(
    starts: list[fx.Node], end: fx.Node, model: nn.Module, *, channelwise: bool = False
) -> bool:
    """Whether the output of one of ``starts`` reaches ``end`` without crossing a further
    convolution or linear layer; ``channelwise=True``: through channel-wise operations
    only."""
    seen: set[fx.Node] = set()
    todo = deque(starts)
    while todo:
        node = todo.popleft()
        if node is end:
            return True
        if node in seen:
            continue
        seen.add(node)
        if channelwise:
            follow = node in starts or _passes_through(node, model)
        else:
            follow = node in starts or not (
                node.op == "call_module"
                and isinstance(model.get_submodule(node.target), _INGRESS_MODULES)
            )
        if follow:
            todo.extend(node.users)
    return False


#: At most this many convolution series per connection (a block has a handful).
_MAX_PATHS = 64


def _chains(
    starts: list[fx.Node], end: fx.Node, model: nn.Module, destination: str
) -> tuple[tuple[str, ...], ...]:
    """Each series of convolutions of the block ``destination`` that leads from one of
    ``starts`` (its ingress convolutions) to ``end`` (the block's output) through
    channel-wise operations, joined to ``end`` at most by a residual addition that reaches it
    through channel-wise operations only (an inverted-residual block: expand, depthwise,
    project, ``x + block(x)``). A series never crosses an earlier residual addition (the
    blocks of a ResNet stage); empty when there is none, or more than ``_MAX_PATHS``."""
    found: list[tuple[str, ...]] = []
    todo = [(node, (str(node.target),)) for node in starts]
    while todo:
        node, chain = todo.pop()
        for user in node.users:
            if user is end:
                found.append(chain)
            elif user.op == "call_module" and isinstance(
                model.get_submodule(user.target), nn.modules.conv._ConvNd
            ):
                if _belongs(user, destination):
                    todo.append((user, (*chain, str(user.target))))
            elif _passes_through(user, model) or (
                _is_add(user) and _reaches([user], end, model, channelwise=True)
            ):
                todo.append((user, chain))
            if len(found) + len(todo) > _MAX_PATHS:
                return ()
    return tuple(sorted(set(found)))


def _passes_through(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` keeps channels apart (a channel-wise module, function or method)."""
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _CHANNELWISE_METHODS
    return False


def _check_direct(
    graph: fx.Graph,
    model: nn.Module,
    name: str,
    end: fx.Node,
    source: str,
    destination: str,
    to_classifier: bool,
) -> None:
    """A linear ingress module must produce the destination's features itself: its output
    reaches ``end`` through channel-wise operations only (not through a further linear
    layer, as in VGG's two-layer head when its hidden layer is not listed as a stage)."""
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if end in nodes:
        return
    seen: set[fx.Node] = set()
    todo = deque(user for node in nodes for user in node.users)
    while todo:
        node = todo.popleft()
        if node is end:
            return
        if node in seen:
            continue
        seen.add(node)
        if _passes_through(node, model):
            todo.extend(node.users)
    what = "the classifier's input" if to_classifier else f"the output of {destination!r}"
    raise _unresolved(
        source,
        destination,
        f"the linear layer {name!r} does not produce {what} directly (another linear layer "
        "in between); list the output of that hidden layer (after its activation) as a stage",
    )


def _unresolved(source: str, destination: str, what: str) -> ValueError:
    return ValueError(
        f"`layers`: cannot resolve the connection from layer {source!r} to layer "
        f"{destination!r}: {what}. Circuits follow convolutions and linear layers through "
        "channel-wise operations (normalisation, activations, pooling, dropout, flatten) and "
        "residual additions; list the layers so that each stage feeds the next through such a "
        "path."
    )


# --------------------------------------------------------------------------------------
# module order


def _module_order_connection(
    model: nn.Module, source: str, destination: str, classifier: str
) -> Connection:
    names = [name for name, _ in model.named_modules()]
    modules = dict(model.named_modules())
    position = names.index(source)
    # skip the source's own submodules
    after = position + 1
    while after < len(names) and names[after].startswith(source + "."):
        after += 1
    first = None
    for name in names[after:]:
        if isinstance(modules[name], _INGRESS_MODULES):
            first = name
            break
    if first is None:
        raise _unresolved(source, destination, "no convolution or linear layer after it")
    if first == classifier:
        if destination != classifier:
            raise _unresolved(source, destination, "no convolution or linear layer in between")
        return Connection(source, destination, (), "module_order")
    ingress = [first]
    block = first.rsplit(".", 1)[0] if "." in first else ""
    if block and block != destination:
        conv = modules[first]
        for name in names:
            parts = name.split(".")
            if (
                name != first
                and name.startswith(block + ".")
                and ("downsample" in parts or "shortcut" in parts)
                and isinstance(modules[name], nn.modules.conv._ConvNd)
                and modules[name].in_channels == getattr(conv, "in_channels", None)
            ):
                ingress.append(name)
    return Connection(source, destination, tuple(ingress), "module_order")


def find_connections(
    model: nn.Module,
    stages: list[str],
    classifier: str,
    *,
    use_fx: bool = True,
    strict: bool = False,
) -> list[Connection]:
    """One :class:`Connection` per consecutive pair of ``stages + [classifier input]``.

    ``strict=True`` (stages that are single blocks): with ``torch.fx``, a block none of
    whose ingress modules reaches its output without a further convolution must have a series
    of convolutions that does (``Connection.paths``); otherwise a ``ValueError``.
    """
    graph_module = trace(model) if use_fx else None
    chain = [*stages, classifier]
    connections = []
    for source, destination in zip(chain[:-1], chain[1:], strict=True):
        if graph_module is not None:
            connection = _fx_connection(
                graph_module.graph, model, source, destination, classifier, strict
            )
        else:
            connection = _module_order_connection(model, source, destination, classifier)
        connections.append(connection)
    return connections
