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
  and is not followed (the identity path is not a weighted connection). A ``permute`` that
  moves the channels last (ConvNeXt's ``LayerNorm2d`` and blocks) is followed, with where the
  channels lie: there only element-wise operations, a LayerNorm over the channels alone,
  linear layers on them (ingress modules, as a 1 x 1 convolution would be) and the permute
  back; any other operation there, a convolution or the classifier reading the permuted
  tensor, and a concatenation (``torch.cat``: DenseNet) raise an error saying that no choice
  of stages helps. A linear ingress
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
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from captum_ext._utils.layers import find_last_linear, is_exported

#: Normalisations and activations: they act on each channel separately. A GroupNorm
#: normalises each group of channels by statistics shared within the group, so channel c's
#: output still comes from channel c alone, shifted and scaled (as a LayerNorm over the
#: channels, with the channels moved last, is followed): the statistics mix, but no
#: channel-to-channel weight adds one channel's map into another's.
_NORMS_AND_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
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
    # padding of the spatial dimensions (zero, constant, reflection, replication, circular)
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
    nn.modules.padding._CircularPadNd,
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
#: functions that act on each element alone: channel-wise wherever the channels are
_ELEMENTWISE_FUNCTIONS = {
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
}
#: ... and those channel-wise only with the channels on dim 1 (whole-channel dropout,
#: pooling over the spatial dims, batch norm, flattening or reducing what follows them)
_CHANNELWISE_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | {
    _F.dropout2d,
    _F.max_pool2d,
    _F.avg_pool2d,
    _F.adaptive_avg_pool2d,
    _F.adaptive_max_pool2d,
    _F.batch_norm,
    _F.group_norm,
    _F.instance_norm,
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
#: Functional convolutions: one that filters each channel alone (a depthwise filter with one
#: output channel per group, as BlurPool's fixed blur ``F.conv2d(x, filt, groups=C)``)
#: keeps channels apart, as a pooling does.
_FUNCTIONAL_CONVOLUTIONS = {
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    _F.conv1d,
    _F.conv2d,
    _F.conv3d,
}
#: What a normalisation module of another class (a ``LayerNorm2d``) may call to count as a
#: normalisation after a convolution: normalisations and element-wise operations (and
#: permutes), no pooling, padding, filtering or reshaping.
_NORMALISING_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | {
    _F.batch_norm,
    _F.group_norm,
    _F.instance_norm,
    _F.layer_norm,
}
#: Shape queries: consumers that produce no tensor (ignored).
_SHAPE_METHODS = {"size", "dim", "numel"}
#: Concatenations: branches joined along the channels (DenseNet, Inception, ShuffleNetV2).
_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}

#: Where a tensor's channels are: ``(axis, ndim)``. Channels first (dim 1, as convolutions read
#: them) is ``(1, None)``, whatever the number of dimensions; a ``permute`` that moves them
#: elsewhere gives the axis they land on and the number of dimensions it permuted.
_Layout = tuple[int, int | None]
_CHANNELS_FIRST: _Layout = (1, None)
#: Element-wise modules, functions and methods: channel-wise wherever the channels are (not
#: PReLU, whose per-channel slopes run along dim 1, nor the normalisations, pooling or
#: flattening, whose channel axis is dim 1).
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    *(
        m
        for m in _NORMS_AND_ACTIVATIONS
        if not issubclass(
            m,
            (
                nn.modules.batchnorm._BatchNorm,
                nn.modules.instancenorm._InstanceNorm,
                nn.GroupNorm,
                nn.PReLU,
            ),
        )
    ),
    nn.Dropout,
    nn.Identity,
)
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to"}
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
      activation / dropout leaves right after it (a module of another class counts as a
      normalisation when all it does keeps channels apart without pooling or reshaping, as
      a ``LayerNorm2d`` that permutes the channels last, normalises them and permutes back;
      :func:`_normalises_in_place`). When the next stage is a block stage (the stem of a
      ResNet), the stage ends right before that block instead (after the max-pool).
    - a hidden linear layer of the head (VGG's and AlexNet's ``classifier.0`` / ``.3``) is a
      stage ending at its post-activation, except the last one before the classifier: its
      (post-activation) output is the pooled feature vector, the classifier's input.
    - when the only stage is a container of blocks (MobileNetV2's ``features``), its blocks
      are the stages (:func:`_blocks_of`); when it is another module holding every
      convolution (a backbone that returns pooled features, with a separate head), the
      stages found inside it are (:func:`_stages_inside`).
    """
    graph = trace(model)
    called = _called_modules(model)
    units = [
        (n, m) for n, m in _units(model, called=called, classifier=classifier) if n != classifier
    ]
    stages = _stages_of_units(model, graph, units)
    if len(stages) == 1 and stages[0][1]:
        return _open_lone_stage(model, graph, stages[0][0], classifier, called)
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


def _stages_of_units(
    model: nn.Module, graph: fx.GraphModule | None, units: list[tuple[str, nn.Module]]
) -> list[tuple[str, bool]]:
    """The stages among ``units`` (:func:`_units`, the classifier left out), by the rules of
    :func:`default_stages`, each as ``(name, is_block)``."""
    calls: dict[str, int] = {}
    if graph is not None:
        for node in graph.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1

    def post_conv(name: str, module: nn.Module) -> bool:
        # a post-activation module the forward pass calls more than once (one nn.ReLU
        # shared by every convolution) has no single output to read: a stage ends before it
        if isinstance(module, _POST_CONV_MODULES):
            return calls.get(name, 0) <= 1
        return graph is not None and _normalises_in_place(graph.graph, model, name, module)

    # hidden linear layers of the head; the last one produces the pooled features
    hidden = [n for n, m in units if isinstance(m, nn.Linear)]
    linear_stages = set(hidden[:-1])
    stages: list[tuple[str, bool]] = []  # (name, is_block)
    i = 0
    while i < len(units):
        name, module = units[i]
        if name in linear_stages:
            end = i
            while end + 1 < len(units) and post_conv(*units[end + 1]):
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
            while end + 1 < len(units) and post_conv(*units[end + 1]):
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
    return stages


def _normalises_in_place(graph: fx.Graph, model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether the leaf ``module`` (named ``name``), of a class not listed as a
    normalisation or activation, acts as one after a convolution: ``torch.fx`` traced
    through it, and from its input to its single output every operation keeps channels apart
    (:func:`_next_layout`), each a normalisation, an element-wise operation or a permute (no
    pooling, padding, filtering or reshaping), and its output has the channels
    first again. A ``LayerNorm2d`` (permute the channels last, LayerNorm over them, permute
    back: each position's channels are normalised together, channel c staying channel c)
    is one; a module fx keeps as a leaf (a ``call_module``) is not."""
    if not _is_leaf(module) or isinstance(module, (*_CHANNELWISE_MODULES, *_INGRESS_MODULES)):
        return False
    inside = [n for n in graph.nodes if n.op != "call_module" and _belongs(n, name)]
    members = set(inside)
    entries = [
        n for n in inside if any(p not in members and p.op != "get_attr" for p in n.all_input_nodes)
    ]
    outputs = [n for n in inside if any(user not in members for user in n.users)]
    if not entries or len(outputs) != 1:
        return False
    layouts: dict[fx.Node, _Layout] = {}
    todo = deque((node, _CHANNELS_FIRST) for node in entries)
    while todo:
        node, layout = todo.popleft()
        if node in layouts:
            if layouts[node] != _next_layout(node, model, layout):
                return False
            continue
        normalising = _is_permute(node) or _calls_one_of(
            node, model, _NORMS_AND_ACTIVATIONS, _NORMALISING_FUNCTIONS, _ELEMENTWISE_METHODS
        )
        if not normalising:
            return False
        after = _next_layout(node, model, layout)
        if after is None:
            return False
        layouts[node] = after
        todo.extend((user, after) for user in node.users if user in members)
    return layouts.get(outputs[0]) == _CHANNELS_FIRST


def _open_lone_stage(
    model: nn.Module,
    graph: fx.GraphModule | None,
    name: str,
    classifier: str,
    called: set[str] | None,
) -> list[str]:
    """The stages when the only one found is the block unit ``name``: its blocks when it is
    a container of them (:func:`_blocks_of`); the stages inside it when it is another
    module holding every convolution of the model (:func:`_stages_inside`); ``[name]``
    otherwise."""
    container = model.get_submodule(name)
    if isinstance(container, nn.Sequential | nn.ModuleList):
        opened = _blocks_of(model, name, classifier)
        return [name] if opened is None else opened
    return _stages_inside(model, graph, name, classifier, called)


def _stages_inside(
    model: nn.Module,
    graph: fx.GraphModule | None,
    name: str,
    classifier: str,
    called: set[str] | None,
) -> list[str]:
    """The stages found inside the module ``name``, the only stage found, when it holds
    every convolution of the model but the classifier (a 1 x 1 convolution head): a
    backbone built without a classifier (timm's ``num_classes=0``, which returns the pooled
    features) with a separate head, whose
    single stage would be the pooled vector. Found by the rules of :func:`default_stages`
    applied to its units, so that it gives the stages the same network with the head inline
    gives (prefixed with ``name``); a single block stage inside is opened in turn. When they
    do not connect as the readout resolves connections, ``[name]`` with a ``UserWarning``
    naming the first connection that fails and why (as :func:`_blocks_of` does)."""
    module = model.get_submodule(name)
    try:  # a 1 x 1 convolution head is the classifier, not a convolution of the backbone
        head = model.get_submodule(classifier) if classifier else None
    except AttributeError:
        head = None

    def convolutions(root: nn.Module) -> int:
        return sum(isinstance(m, nn.modules.conv._ConvNd) and m is not head for m in root.modules())

    if convolutions(module) != convolutions(model):
        return [name]
    inner = _stages_of_units(model, graph, _units(module, f"{name}.", called, classifier))
    if not inner:
        return [name]
    if len(inner) == 1 and inner[0][1]:
        return _open_lone_stage(model, graph, inner[0][0], classifier, called)
    names = [stage for stage, _ in inner]
    # the rules of default_stages, so the check of the same network with its head inline
    # (stages such as ResNet's layer1 hold several blocks: not strict)
    reason = _why_unconnected(model, names, classifier, strict=False)
    if reason is None:
        return names
    warnings.warn(
        f"`layers`: the only stage found in {type(model).__name__} is {name!r}, a module "
        f"holding every convolution, and the stages inside it {names} could not be "
        f"connected: {reason} The graph has a single stage, [{name!r}] (its output only); "
        "pass the stages as `layers` explicitly to try otherwise.",
        UserWarning,
        stacklevel=5,
    )
    return [name]


def _why_unconnected(
    model: nn.Module, stages: list[str], classifier: str, strict: bool = True
) -> str | None:
    """Why ``stages`` do not connect as the readout resolves connections
    (:func:`find_connections` with ``strict``: True for stages that are single blocks, False
    for stages found by :func:`default_stages`' rules, as the readout checks them; then the
    channel check of :func:`_unresolved_channels`); None when they do."""
    try:
        connections = find_connections(model, stages, classifier, strict=strict)
    except ValueError as error:
        return str(error).split(": ", 1)[-1].split(" Circuits follow", 1)[0]
    return _unresolved_channels(model, connections)


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
    reason = _why_unconnected(model, blocks, classifier)
    if reason is None:
        return blocks
    warnings.warn(
        f"`layers`: the only stage found in {type(model).__name__} is {name!r}, a container "
        f"of blocks, and its blocks {blocks} could not be connected as stages: {reason} "
        f"The graph has a single stage, [{name!r}] (its last block's channels only); pass "
        "the blocks as `layers` explicitly to try otherwise.",
        UserWarning,
        stacklevel=5,
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


def is_pointwise_classifier(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution that acts as a linear layer on a pooled
    ``N x C x 1 x 1`` map: 1 x 1 kernel, one group, no padding (its output at the one
    position is ``weight.view(out, in) @ h + bias``, whatever its stride or dilation)."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and all(k == 1 for k in module.kernel_size)
        and module.groups == 1
        and (module.padding == "valid" or all(p == 0 for p in module.padding))
    )


def find_classifier(model: nn.Module) -> str:
    """Name of the model's final linear layer (the default classifier), by the package's one
    rule (:func:`captum_ext._utils.layers.find_last_linear`; without a forward pass, the last
    ``nn.Linear`` in ``named_modules()`` order). A model without one is refused; the
    message names its last 1 x 1 convolution, which may be passed as ``classifier`` when it
    is applied to the pooled ``N x C x 1 x 1`` map (a 1 x 1 convolution head)."""
    pointwise = [name for name, m in model.named_modules() if name and is_pointwise_classifier(m)]
    here = f" (here perhaps {pointwise[-1]!r})" if pointwise else ""
    name, _ = find_last_linear(
        model,
        None,
        argument="classifier",
        remedy="pass `{argument}`: the final linear layer, whose input is the pooled feature "
        "vector, or a 1 x 1 convolution (groups=1, no padding) applied to the pooled "
        f"N x C x 1 x 1 map{here}",
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
    layouts: dict[str, _Layout] = {}  # where each ingress module reads the channels
    reached_classifier = False
    seen = {start}
    # each node with the layout of the channels it receives
    todo = deque((user, _CHANNELS_FIRST) for user in start.users)
    while todo:
        node, layout = todo.popleft()
        if node in seen:
            continue
        seen.add(node)
        after: _Layout | None = None  # the layout passed on; None: not followed
        if node.op == "call_module" and (
            node.target == classifier
            or isinstance(model.get_submodule(node.target), _INGRESS_MODULES)
        ):
            module = model.get_submodule(node.target)
            if node in needed and not _reads_channels(module, layout):
                raise _unresolved_moved(source, destination, node, layout)
            if node.target == classifier:
                reached_classifier = True
            elif node in needed:
                ingress.append(node.target)
                layouts[node.target] = layout
        elif _is_add(node) or (node.op == "call_function" and node.target is getattr):
            pass  # residual join: the identity path carries no weight
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            pass
        elif node.op in ("call_module", "call_function", "call_method"):
            after = _next_layout(node, model, layout)
            if after is None and node in needed:
                if node.op == "call_function" and node.target in _CONCATENATIONS:
                    raise _unresolved(
                        source, destination, _describe(node), why_listing_fails=_CONCATENATED
                    )
                if layout != _CHANNELS_FIRST or _is_permute(node):
                    raise _unresolved_moved(source, destination, node, layout)
                if node.op == "call_module":
                    module = model.get_submodule(node.target)
                    what = f"module {node.target!r} ({type(module).__name__})"
                else:
                    what = _describe(node)
                raise _unresolved(source, destination, _unsupported(what))
        if after is not None:
            todo.extend((user, after) for user in node.users)
    for name in ingress:
        if isinstance(model.get_submodule(name), nn.Linear):
            _check_direct(
                graph,
                model,
                name,
                end,
                source,
                destination,
                destination == classifier,
                layouts[name],
            )
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
    starts: list[fx.Node],
    end: fx.Node,
    model: nn.Module,
    *,
    channelwise: bool = False,
    layout: _Layout = _CHANNELS_FIRST,
) -> bool:
    """Whether the output of one of ``starts`` reaches ``end`` without crossing a further
    convolution or linear layer; ``channelwise=True``: through channel-wise operations
    only, from outputs whose channels lie as ``layout`` says, to ``end`` with its channels
    first."""
    seen: set[fx.Node] = set()
    todo = deque((node, layout) for node in starts)
    while todo:
        node, current = todo.popleft()
        if node is end and (not channelwise or current == _CHANNELS_FIRST):
            return True
        if node in seen:
            continue
        seen.add(node)
        after: _Layout | None = current
        if channelwise and node not in starts:
            after = _next_layout(node, model, current)
        elif not channelwise and node not in starts:
            ingress = node.op == "call_module" and isinstance(
                model.get_submodule(node.target), _INGRESS_MODULES
            )
            after = None if ingress else current
        if after is not None:
            todo.extend((user, after) for user in node.users)
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
    todo = [(node, (str(node.target),), _CHANNELS_FIRST) for node in starts]
    while todo:
        node, chain, layout = todo.pop()
        for user in node.users:
            after = None
            if user is end:
                if layout == _CHANNELS_FIRST:
                    found.append(chain)
            elif user.op == "call_module" and isinstance(
                model.get_submodule(user.target), nn.modules.conv._ConvNd
            ):
                if _belongs(user, destination) and layout == _CHANNELS_FIRST:
                    todo.append((user, (*chain, str(user.target)), layout))
            elif (after := _next_layout(user, model, layout)) is not None:
                todo.append((user, chain, after))
            elif _is_add(user) and _reaches([user], end, model, channelwise=True, layout=layout):
                todo.append((user, chain, layout))
            if len(found) + len(todo) > _MAX_PATHS:
                return ()
    return tuple(sorted(set(found)))


def _is_permute(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "permute") or (
        node.op == "call_function" and node.target is torch.permute
    )


def _permutation(node: fx.Node) -> list[int] | None:
    """The dimensions of a ``permute`` node as non-negative ints (``x.permute(0, 2, 3, 1)``,
    ``x.permute([0, 2, 3, 1])``, ``torch.permute(x, [0, 2, 3, 1])``); None when they are
    not all constant ints, or not a permutation."""
    if node.op == "call_method":
        dims = node.args[1:] or node.kwargs.get("dims")
    else:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    if isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if not isinstance(dims, (list, tuple)) or not dims:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    rank = len(dims)
    dims = [d % rank if -rank <= d < rank else -1 for d in dims]
    return dims if sorted(dims) == list(range(rank)) else None


def _layer_norm_shape(node: fx.Node, model: nn.Module) -> Any:
    """The ``normalized_shape`` of a LayerNorm node (an ``nn.LayerNorm`` module or
    ``F.layer_norm``); None for any other node."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        return module.normalized_shape if isinstance(module, nn.LayerNorm) else None
    if node.op == "call_function" and node.target is _F.layer_norm:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    return None


def _next_layout(node: fx.Node, model: nn.Module, layout: _Layout) -> _Layout | None:
    """Where the channels of ``node``'s output lie when its input has them as ``layout``
    says, if ``node`` keeps channels apart; None otherwise.

    With the channels first: the channel-wise modules, functions and methods
    (normalisation, activations, pooling, dropout, flatten). A ``permute`` with constant
    dimensions moves them (to the axis channel 1 lands on). With the channels moved by a
    permute (ConvNeXt's ``LayerNorm2d`` and blocks, ``N x h x w x C``): element-wise
    operations, a LayerNorm over the channels alone (when they are the last axis: each
    position's channels are normalised together, and channel c stays channel c, with no
    channel-to-channel weight) and a further permute. Anything else there (a batch norm,
    pooling or a flatten, whose channel axis is dim 1) is not followed.
    """
    if _is_permute(node):
        dims = _permutation(node)
        axis, rank = layout
        if dims is None or (rank is not None and rank != len(dims)) or axis >= len(dims):
            return None
        moved = dims.index(axis)
        return _CHANNELS_FIRST if moved == 1 else (moved, len(dims))
    if layout == _CHANNELS_FIRST:
        channelwise = (
            _calls_one_of(
                node, model, _CHANNELWISE_MODULES, _CHANNELWISE_FUNCTIONS, _CHANNELWISE_METHODS
            )
            or _pads_spatial_only(node)
            or _filters_each_channel(node, model)
        )
        return layout if channelwise else None
    axis, rank = layout
    shape = _layer_norm_shape(node, model)
    if shape is not None:
        over_channels = isinstance(shape, (int, list, tuple, torch.Size)) and (
            isinstance(shape, int) or len(shape) == 1
        )
        return layout if over_channels and axis == rank - 1 else None
    elementwise = _calls_one_of(
        node, model, _ELEMENTWISE_MODULES, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS
    )
    return layout if elementwise else None


def _pads_spatial_only(node: fx.Node) -> bool:
    """Whether ``node`` is an ``F.pad`` of at most the last two dimensions (constant ints,
    any mode): on a 2-D map, its spatial dimensions only, so each channel is padded alone.
    (On a 1-D map ``N x C x L`` four entries would pad the channels too; their number then
    differs from the next convolution's input channels, which the readout refuses.)"""
    if node.op != "call_function" or node.target is not _F.pad:
        return False
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    return (
        isinstance(pad, (list, tuple))
        and len(pad) <= 4
        and all(isinstance(p, int) and not isinstance(p, bool) for p in pad)
    )


def _filters_each_channel(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` is a functional convolution (``F.conv2d``, ...) with a weight of the
    model (a ``get_attr``) holding one single-channel filter per group and ``groups`` equal
    to their number: each output channel filters its own input channel alone (BlurPool's
    blur), so channels stay apart as through a pooling."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_CONVOLUTIONS:
        return False
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or type(groups) is not int:
        return False
    tensor: Any = model
    for part in str(weight.target).split("."):
        tensor = getattr(tensor, part, None)
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dim() >= 3
        and tensor.shape[0] == groups
        and tensor.shape[1] == 1
    )


def _calls_one_of(
    node: fx.Node,
    model: nn.Module,
    modules: tuple[type[nn.Module], ...],
    functions: set,
    methods: set[str],
) -> bool:
    """Whether ``node`` calls a module of one of the classes ``modules``, one of
    ``functions`` or one of the tensor ``methods``."""
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _reads_channels(module: nn.Module, layout: _Layout) -> bool:
    """Whether an ingress module (or the classifier) reads a tensor's channels as its input
    channels: with the channels first, or for a linear layer with the channels last (then
    it is a 1 x 1 convolution, ``W[d, s]`` on each position)."""
    if layout == _CHANNELS_FIRST:
        return True
    axis, rank = layout
    return isinstance(module, nn.Linear) and axis == rank - 1


def _check_direct(
    graph: fx.Graph,
    model: nn.Module,
    name: str,
    end: fx.Node,
    source: str,
    destination: str,
    to_classifier: bool,
    layout: _Layout = _CHANNELS_FIRST,
) -> None:
    """A linear ingress module must produce the destination's features itself: its output
    (with its channels as ``layout`` says) reaches ``end`` through channel-wise operations
    only, with the channels first there (not through a further linear layer, as in VGG's
    two-layer head when its hidden layer is not listed as a stage)."""
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if end in nodes and layout == _CHANNELS_FIRST:
        return
    seen: set[fx.Node] = set()
    todo = deque((user, layout) for node in nodes for user in node.users)
    blocked: fx.Node | None = None  # the first operation the channels cannot pass
    while todo:
        node, current = todo.popleft()
        if node is end and current == _CHANNELS_FIRST:
            return
        if node in seen:
            continue
        seen.add(node)
        after = _next_layout(node, model, current)
        if after is not None:
            todo.extend((user, after) for user in node.users)
        elif blocked is None:
            blocked = node
    what = "the classifier's input" if to_classifier else f"the output of {destination!r}"
    if layout != _CHANNELS_FIRST and destination == name:
        raise _unresolved(
            source,
            destination,
            f"the linear layer {name!r} reads channels a permute moved last, so its output "
            "has them last too, and a stage's channels are read on dimension 1; "
            + _permuted_remedy(model),
        )
    if blocked is not None and _is_linear_module(blocked, model):
        between = f"another linear layer, {blocked.target!r}, in between"
        remedy = "list the output of that hidden layer (after its activation) as a stage"
        if layout != _CHANNELS_FIRST:
            remedy = "its hidden layer's channels are permuted; " + _permuted_remedy(model)
    else:
        op = "no path" if blocked is None else f"{blocked.op} {_node_label(blocked)}"
        between = f"it passes {op}, which is not a channel-wise operation"
        remedy = "Listing more stages cannot help there"
        if layout != _CHANNELS_FIRST:
            remedy += " (the channels were moved by a permute); " + _permuted_remedy(model)
    raise _unresolved(
        source,
        destination,
        f"the linear layer {name!r} does not produce {what} directly ({between}); {remedy}",
    )


def _is_linear_module(node: fx.Node, model: nn.Module) -> bool:
    """Whether ``node`` calls an ``nn.Linear`` or convolution module of ``model``."""
    if node.op != "call_module":
        return False
    module = model.get_submodule(str(node.target))
    return isinstance(module, nn.Linear | nn.modules.conv._ConvNd)


def _node_label(node: fx.Node) -> str:
    """A short name of what ``node`` calls (``permute``, ``mean``, ``mix.linear``)."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _permuted_remedy(model: nn.Module) -> str:
    """Which stages to list where the channels are permuted (ConvNeXt's, named)."""
    remedy = "list stages outside the permuted part"
    if "convnext" in type(model).__name__.lower():
        remedy += " (for ConvNeXt, the stages features.1, features.3, features.5, features.7)"
    return remedy


#: Why a concatenation cannot be read out, whatever the stages.
_CONCATENATED = (
    "CircuitReadout does not read out across a concatenation of branches along the channels "
    "(DenseNet's dense blocks, Inception's mixed blocks, ShuffleNetV2's blocks), as no "
    "convolution, nor series of them, produces all of its channels"
)


def _unsupported(what: str) -> str:
    """Where a connection fails at an operation the readout does not follow: ``what`` (a
    module or function) named as unsupported."""
    return (
        f"{what} is not supported by CircuitReadout between stages (it is not known to keep "
        "channels apart)"
    )


def _unresolved(
    source: str, destination: str, what: str, *, why_listing_fails: str | None = None
) -> ValueError:
    """The error for a connection that cannot be resolved, ``what`` saying where it fails.
    ``why_listing_fails``: why no choice of stages can help (otherwise the advice is to
    list the stages so that each feeds the next through a path the readout follows)."""
    advice = (
        "; list the layers so that each stage feeds the next through such a path."
        if why_listing_fails is None
        else f". Listing more stages cannot help: {why_listing_fails}."
    )
    return ValueError(
        f"`layers`: cannot resolve the connection from layer {source!r} to layer "
        f"{destination!r}: {what}. Circuits follow convolutions and linear layers through "
        "channel-wise operations (batch, instance and group normalisation, activations, "
        "pooling, spatial padding, per-channel filters, dropout, flatten; with "
        "the channels permuted last, as in ConvNeXt, element-wise activations, a LayerNorm "
        "over the channels and linear layers on them until the permute back) and residual "
        f"additions{advice}"
    )


def _unresolved_moved(source: str, destination: str, node: fx.Node, layout: _Layout) -> ValueError:
    """The error for ``node``, met with the channels as ``layout`` says, where the readout
    does not follow them: a permute it cannot read, or an operation on channels a permute
    moved that does not keep them apart there (or a convolution reading them there)."""
    if _is_permute(node) and layout == _CHANNELS_FIRST:
        what = f"{_describe(node)}, whose dimensions are not a permutation of constant ints"
    else:
        axis, rank = layout
        what = (
            f"{_describe(node)} on a tensor whose channels a permute moved to dimension "
            f"{axis} of {rank}"
        )
    return _unresolved(
        source,
        destination,
        what,
        why_listing_fails="a stage's channels are read on dimension 1, and between a permute "
        "that moves them and the permute back only the operations above are followed",
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
