"""Channel-level circuit readout: the pathway a network uses for one input, as a graph."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from .._utils.batched_grad import call_model, in_model_precision, objective_gradients
from .._utils.hooks import call_hook, registered_hooks
from .._utils.layers import resolve_layer, uncompiled
from .._utils.model_state import gradients_on, leaves_inference_mode, preserved_state
from .._utils.precision import precise_dtype
from .._utils.training import unwrap_distributed
from .._utils.validation import (
    check_int,
    class_selection,
    format_additional_forward_args,
    format_inputs,
)
from .connection import (
    Connection,
    _contains_conv,
    concatenates,
    default_stages,
    find_classifier,
    find_connections,
    is_pointwise_classifier,
)

#: ``layer`` attribute of the pooled-feature nodes (the classifier's input).
POOLED = "pooled"
#: ``layer`` attribute of the class nodes.
CLASS = "class"
#: Edge kinds.
KINDS = ("weight_activation", "gradient", "class")

_DEFAULT_K_STAGE = 24
_DEFAULT_K_LAST = 32
_DEFAULT_K_POOLED = 48


def node_id(layer: str, channel: int) -> str:
    """The node key used in circuit graphs: ``"<layer>:<channel>"`` (e.g. ``"layer2:17"``)."""
    return f"{layer}:{channel}"


#: the attention modules of vision transformers: torch's own; those of other libraries
#: (torchvision's Swin ``ShiftedWindowAttention``, timm's ``Attention``) are known by their
#: class name and their heads (:data:`_HEAD_COUNTS`); a CNN's attention gate (CBAM's channel or
#: spatial attention, squeeze-excitation) has no heads
_ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer)
#: how libraries name an attention module's number of heads (torchvision and timm; Hugging
#: Face's ViT, DeiT and Swin; vit-pytorch)
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "heads")


def _transformer_refusal(network: nn.Module, error: ValueError) -> ValueError | None:
    """The documented refusal of vision transformers, for a connection that could not be
    resolved (``error``) in a model with attention modules; None for any other model. Only
    a failed connection is refused so: a CNN with an attention gate whose stages connect is
    read out as before."""
    kinds = sorted(
        {
            type(m).__name__
            for m in network.modules()
            if isinstance(m, _ATTENTION_MODULES)
            or (
                type(m).__name__.endswith("Attention")
                and any(hasattr(m, heads) for heads in _HEAD_COUNTS)
                and not _contains_conv(m)
            )
        }
    )
    if not kinds:
        return None
    return ValueError(
        f"`model`: {type(network).__name__} has attention modules ({', '.join(kinds)}), as a "
        "vision transformer does, and vision transformers are not supported: CircuitReadout "
        "follows channels from convolution to convolution (the papers' scope is CNNs), and "
        "attention mixes tokens through no fixed channel-to-channel weight. (The connection "
        f"that failed: {str(error).split(' Circuits follow', 1)[0]})"
    )


class _NoIngressProduces(ValueError):
    """A connection none of whose ingress modules produces the destination's channels. Its
    advice (list the stages in between, or that a concatenation of branches cannot be read
    out) needs a ``torch.fx`` trace of the model, made once the readout's hooks are removed
    (:meth:`explained`)."""

    def __init__(self, head: str, destination: str) -> None:
        super().__init__(f"{head}; list every convolutional stage in between.")
        self.head, self.destination = head, destination

    def explained(self, network: nn.Module) -> ValueError:
        if self.destination == POOLED or not concatenates(network, self.destination):
            return ValueError(*self.args)  # a plain ValueError: the private type stays here
        return ValueError(
            f"{self.head}: {self.destination!r} concatenates branches along the channels "
            "(torch.cat, as ShuffleNetV2's and Inception's blocks do), so each "
            "of its channels comes from one branch and no convolution, nor series of them, "
            "produces them all. Listing more stages cannot help: CircuitReadout does not "
            "read out across a concatenation of branches."
        )


def _not_logits(output: Any) -> ValueError:
    """The error for a model whose output is not ``N x classes`` logits. An output that
    carries them in a ``logits`` field (a Hugging Face model's ``ImageClassifierOutput``,
    or a dict's ``"logits"``) is read out through :class:`captum_ext.data.LogitsOutput`,
    which returns that field and keeps the model's layer names."""
    got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    field = isinstance(getattr(output, "logits", None), Tensor) or (
        isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor)
    )
    if not isinstance(output, Tensor) and field:
        return ValueError(
            f"`model` must return N x classes logits, got {got} with a `logits` tensor (a "
            "Hugging Face model?): read it out as CircuitReadout(captum_ext.data.LogitsOutput("
            "model), ...), which returns that field and keeps the layer names."
        )
    return ValueError(f"`model` must return N x classes logits, got {got}.")


def _module_name(model: nn.Module, module: nn.Module, argument: str) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            if not name:
                raise ValueError(f"`{argument}` is the model itself; pass one of its layers.")
            return name
    raise ValueError(f"`{argument}`: the module {type(module).__name__} is not part of the model.")


def _energy(tensor: Tensor) -> Tensor:
    """Per-channel L2 norm, (N, C): over the map for N x C x ..., |value| for N x C."""
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    tensor = tensor.detach().to(dtype)
    if tensor.dim() > 2:
        return tensor.flatten(2).norm(dim=2)
    return tensor.abs()


def _dense_l1(module: nn.Module) -> Tensor:
    """(out, in) matrix of L1 norms of the kernel taps W[d, s] (zero across groups)."""
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        return weight.abs()
    taps = weight.abs().flatten(2).sum(dim=2)  # (out, in / groups)
    groups = module.groups
    if groups == 1:
        return taps
    return torch.block_diag(*taps.split(module.out_channels // groups, dim=0))


def _flattened_l1(linear: nn.Linear, channels: int) -> Tensor:
    """(out, channels) L1 norms of a linear layer reading a flattened C x h x w map.

    ``torch.flatten`` of an N x C x h x w map puts channel c, position (i, j) at feature
    f = c * h * w + i * w + j. The linear layer is then a convolution whose kernel covers
    the whole map (kernel h x w, one output position): its taps for (d, c) are
    W[d, c * h * w + i * w + j], so the edge's "L1 norm over the kernel taps" is
    sum_{i, j} |W[d, c * h * w + i * w + j]|, the row's absolute weights summed over the
    P = h * w = in_features / C consecutive features of channel c.
    """
    weight = linear.weight.detach()
    return weight.abs().reshape(weight.shape[0], channels, -1).sum(dim=2)


def _in_device_order(
    calls: list[tuple[Tensor, Tensor | None]], name: str, is_classifier: bool
) -> list[tuple[Tensor, Tensor | None]]:
    """The calls of one stage: exactly one, or one per device (nn.DataParallel replicas)."""
    argument = "classifier" if is_classifier else "layers"
    devices = [energy.device for energy, _ in calls]
    if len(calls) == 1 or (calls and len(set(devices)) == len(devices)):
        # DataParallel splits the batch in device order
        return sorted(calls, key=lambda call: call[0].device.index or 0)
    what = "did not run" if not calls else f"ran {len(calls)} times"
    raise ValueError(
        f"`{argument}`: layer {name!r} {what} in one forward pass; each stage must run exactly "
        "once."
    )


def _same_names(names: Any, expected: tuple[str, ...]) -> bool:
    """Whether ``names`` (``layers`` as it is now: a tuple, or a list assigned since) lists
    the names ``expected``."""
    return isinstance(names, Sequence) and not isinstance(names, str) and tuple(names) == expected


def _classifier_weight(module: nn.Module) -> Tensor:
    """The classifier's ``(classes, features)`` weight: a linear layer's, or a 1 x 1
    convolution's ``weight.view(out, in)`` (on a pooled ``1 x 1`` map it computes
    ``weight.view(out, in) @ h + bias``, the linear layer with that weight)."""
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Linear) else weight.flatten(1)


def _classifier_outputs(module: nn.Module) -> int:
    """The classifier's number of outputs (classes)."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _warn_random_graphs(model: nn.Module) -> None:
    """The methods' :class:`~captum_ext.attr.RandomMapsWarning` (once per model) for a model
    left in train mode with dropout, DropBlock or stochastic depth active: each forward pass
    drops other parts of the activations, so the energies (and gradients), and with them the
    graphs' nodes and edges, differ from call to call. The model is read out in the mode it
    is in (a train-mode batch norm, which draws nothing at random, is read as it normalises)."""
    from captum_ext.attr._cam import warn_random_in_train_mode  # (attr is not needed before)

    warn_random_in_train_mode("CircuitReadout", model, "graphs")


def _stable_top(values: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries along the last dim; ties keep the lower index first."""
    return values.argsort(dim=-1, descending=True, stable=True)[..., :k]


class CircuitReadout:
    r"""Read the channel-level circuit a CNN uses for each input, as a ``networkx.DiGraph``.

    From "Minimalist Explanation Generation and Circuit Discovery" (Suhail, Anand, Sethi,
    arXiv 2509.25686). One forward pass records the activations :math:`A^l` of each stage
    ``l`` and the pooled feature vector ``h`` (the input of the final linear layer, the
    classifier); then, per example:

    1. Channel energy: ``E^l_c = || A^l_c ||_2`` (L2 norm of channel c's map; ``|h_j|`` for
       the pooled features). The ``top_k`` channels by energy of each stage become nodes.
    2. Stage to stage: for source channel s of stage l and destination channel d of stage
       l + 1, ``weight(s -> d) = (sum over ingress modules of sum_taps |W[d, s, :, :]|) * E^l_s``
       where the ingress modules are the convolutions that consume stage l and produce the
       channels of stage l + 1 (for a residual stage the first block's first conv and its 1 x 1
       downsample conv; an ingress conv whose outputs are not the stage's channels, such as
       the first conv of a bottleneck block, is left out). Where no ingress module produces
       them, as in an inverted-residual block (MobileNetV2: expand, depthwise, project
       convs, and ``x + block(x)``), the block's series of convs from the source to its
       output is composed: ``sum_taps |W|`` becomes the product of the series' tap-L1
       matrices, ``(|W_project| |W_depthwise| |W_expand|)[d, s]`` (the sum over the
       intermediate channels of the products of tap L1 norms); the identity path of the
       residual addition carries no weight, as in a ResNet. Each destination keeps its
       ``edges_per_node`` strongest incoming edges among the kept source nodes.
    3. Last stage to pooled features: a global pooling ties pooled feature j to channel j of the
       last stage (one edge ``j -> j`` of weight ``E^L_j``: the pooling's taps have L1 norm 1);
       when a linear layer sits in between (an MLP head), its ``|W[d, s]|`` is used as in 2.
       A flatten straight into the classifier ties feature f to channel f // P (P positions
       per channel; one tap of weight 1, so the edge weighs ``E^L_c``).
    4. Features to classes: ``weight(j -> y) = |W_fc[y, j]| * |h_j|``; the ``top_classes``
       classes by probability (always including the target) each keep their
       ``edges_per_class`` strongest incoming edges.
    5. ``gradient=True``: the target logit ``z_y`` is backpropagated (one backward for the
       batch) and every stage-to-stage (and tie) edge is multiplied by the gradient magnitude
       at its destination channel, ``G^{l+1}_d = || d z_y / d A^{l+1}_d ||_2``
       (``|d z_y / d h_d|`` for pooled features). Feature-to-class edges use ``d z_c / d h_j``
       in place of ``W_fc[c, j]``: the backpropagated gradient for the target class, the
       classifier's weights for the other classes (the same value when the logits are the
       classifier's output). Since all edges into a node are scaled alike, the gradient
       variant changes the weights (and so the flow), not which edges are kept.

    Edges of weight 0 (a silent source channel) are not drawn.

    **Flattened maps** (VGG, AlexNet, any conv -> flatten -> linear network): a linear layer
    reading the flattened ``C x h x w`` map of a stage sees channel c, position (i, j) at
    feature ``f = c * h * w + i * w + j``. It is a convolution whose kernel covers the whole
    map, with taps ``W[d, c * h * w + i * w + j]`` for (d, c), so the edge of 2. is
    ``weight(c -> d) = (sum_{i, j} |W[d, c * h * w + i * w + j]|) * E^l_c``: the absolute
    weights of row d summed over the ``P = h * w = in_features / C`` consecutive features of
    channel c. ``h x w`` is the map as flattened (after any pooling in between, e.g. VGG's
    ``AdaptiveAvgPool2d(7)``: 512 x 7 x 7 = 25088 features), not the stage's own map.

    **Stages** (``layers=None``) are found from the model's modules in registration order:
    a container of residual blocks (``layer1`` .. ``layer4`` of a ResNet) is one stage; a
    plain convolution's stage ends at its post-activation (the normalisation / activation
    / dropout modules right after it), except that a stem feeding a residual stage ends right
    before it (after the ResNet max-pool). The classifier is the last ``nn.Linear`` (or
    ``classifier``); its input is the pooled stage. Hidden linear layers of the head other
    than the last one before the classifier are stages too, ending at their post-activation
    (VGG's and AlexNet's first classifier layer: ``classifier.2`` / ``classifier.3``), so
    that every connection crosses exactly one linear layer. When the only stage found is a
    container of blocks (MobileNetV2's ``features``), each of its blocks is a stage instead
    (``features.0`` .. ``features.18``); where its blocks cannot be connected (EfficientNet's
    squeeze-and-excitation gates, blocks that concatenate branches) the container stays one
    stage and a ``UserWarning`` says why and that the blocks may be passed as ``layers``.
    When the only stage found is another module holding every convolution (a backbone built
    without a classifier, which returns the pooled features, with a separate head), the
    stages are found inside it, as for the same network with its head inline
    (``backbone.act1``, ...), or, where those do not connect, it stays one stage with a
    ``UserWarning``. A normalisation after a convolution may be a batch, instance or group
    norm, or a module of another class (a ``LayerNorm2d``) that, traced with ``torch.fx``,
    only normalises and permutes the channels back; GroupNorm, like a LayerNorm over the
    channels, shares its statistics within a group but adds no channel's map into another's,
    so it carries no channel-to-channel weight. Spatial padding (``F.pad``, padding modules)
    and functional per-channel filters (BlurPool's ``F.conv2d(x, filt, groups=C)``) are
    followed between stages; an operation that is not is named as unsupported. The
    ingress modules are found with ``torch.fx`` where the model traces (following the stage's
    output through channel-wise operations, stopping at convolutions, linear layers and
    residual additions) and from module order otherwise; a connection that cannot be
    resolved raises a ``ValueError`` naming the layers, in the constructor where the traced
    graph shows it (a stage skipped in ``layers``), otherwise in :meth:`readout`. The readout
    also checks that the stages run in the order of ``layers`` (and, for connections found
    from module order, that their ingress modules run between their stages): a model whose
    modules are registered in another order than they run is refused with a ``ValueError``
    naming both orders, not read out through the wrong convolutions.

    Node counts with the defaults: the bundled ``DigitCNN`` gives 130 nodes (stages
    ``features.1``, ``features.4``, ``features.7`` with 16, 24 and 32 nodes, 48 pooled
    features, 10 classes); torchvision's ``resnet18`` gives 186 (``maxpool`` and ``layer1`` to
    ``layer3`` with 24 each, ``layer4`` 32, 48 pooled, 10 classes); torchvision's
    ``mobilenet_v2`` has the 19 stages ``features.0`` .. ``features.18`` (its blocks);
    torchvision's ``vgg11`` has the stages ``features.1`` .. ``features.19`` (the eight conv
    post-activations) and ``classifier.2``, its pooled features being the 4096 inputs of
    ``classifier.6``.

    **Permuted channels** (ConvNeXt): a ``permute`` that moves the channels last
    (``N x h x w x C``, as ConvNeXt's ``LayerNorm2d`` and blocks do) is followed to the
    permute back through element-wise activations, a LayerNorm over the channels alone
    (channel c stays channel c: no channel-to-channel weight) and linear layers on the
    channels, which are ingress modules as a 1 x 1 convolution would be (``|W[d, s]|``).
    torchvision's ConvNeXt reads out with its stages listed, ``layers=["features.1",
    "features.3", "features.5", "features.7"]``, joined by the 2 x 2 downsampling
    convolutions ``features.2.1``, ``.4.1``, ``.6.1`` and tied to the pooled features
    through its head's ``LayerNorm2d``; its default is the single stage ``features`` with
    a ``UserWarning`` (its blocks' depthwise convolutions reach their outputs only through
    linear layers). Any other operation on permuted channels raises a ``ValueError``.

    Vision transformers are not supported (the papers' scope is CNNs): a model with
    attention modules (``nn.MultiheadAttention``, torchvision's ViT and Swin) whose stages
    cannot be connected is refused with a ``ValueError`` saying so. Nor are stages that
    concatenate branches along the channels (ShuffleNetV2's blocks, DenseNet's dense blocks,
    Inception's mixed blocks): no convolution produces all of their channels, and the
    ``ValueError`` says that listing more stages cannot help.

    Args:
        model (nn.Module): the classifier, returning ``N x classes`` logits. It is run as it
            is (call ``model.eval()`` first for deterministic graphs) and left unchanged;
            in train mode with dropout or stochastic depth active, :meth:`readout` gives a
            :class:`~captum_ext.attr.RandomMapsWarning` (once per model).
            A model whose output carries them in a ``logits`` field (Hugging Face's) is
            read out as ``captum_ext.data.LogitsOutput(model)``, which keeps its layer names.
        layers (str, nn.Module or list, optional): the stages, in forward order, each
            returning ``N x C x ...`` (or ``N x C``): a list of names or modules, one per
            stage; a lone name or module is one stage. Default: discovered as described
            above.
        top_k (int or sequence of int, optional): nodes kept per stage. An int applies to
            every stage and the pooled features; a sequence gives one value per stage plus one
            for the pooled features. Default: 24 per stage, 32 for the last stage, 48 for the
            pooled features (fewer where a stage has fewer channels).
        edges_per_node (int, optional): strongest incoming edges kept per destination node.
            Default: 4
        gradient (bool, optional): use the gradient-weighted variant (5. above). Default: False
        classifier (str or nn.Module, optional): the final linear layer, or a 1 x 1
            convolution (groups=1, no padding) applied to the pooled ``N x C x 1 x 1`` map,
            which is the linear layer of weight ``weight.view(out, in)``. Default: the last
            ``nn.Linear`` of the model (a model without one is refused, naming its last
            1 x 1 convolution).
        top_classes (int, optional): class nodes per graph. Default: 10
        edges_per_class (int, optional): incoming edges kept per class node. Default: 3

    Attributes:
        layers (tuple of str): the stage names (fixed: a readout with other stages or
            another classifier is a new ``CircuitReadout``; one changed is refused).
        classifier (str): the final layer's name (a linear layer or 1 x 1 convolution).
        connections (tuple of Connection): per consecutive pair of stages (the last pair being
            the last stage and the classifier), the ingress modules and how they were found
            (``"fx"`` or ``"module_order"``), and for a destination block such as an
            inverted-residual block the series of its convs that are composed (``paths``).
        top_k (tuple of int): nodes kept per stage and for the pooled features (may be
            assigned in the constructor's forms: an int, a sequence, or None for the
            default).

    Examples::

        >>> import torch
        >>> from captum_ext.circuits import CircuitReadout, compare
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import load_sample_digits
        >>> model = load_bundled_model()
        >>> images, labels = load_sample_digits()
        >>> readout = CircuitReadout(model)
        >>> graphs = readout.readout(images[:2], target=labels[:2])
        >>> graphs[0].number_of_nodes()
        130
        >>> mask = torch.zeros_like(images[:1]); mask[..., 7:21, 7:21] = 1
        >>> g_x, g_e = readout.readout(images[:1])[0], readout.readout(mask * images[:1])[0]
        >>> 0.0 <= compare(g_x, g_e).edge_jaccard <= 1.0
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str | nn.Module] | None = None,
        top_k: int | Sequence[int] | None = None,
        edges_per_node: int = 4,
        gradient: bool = False,
        classifier: str | nn.Module | None = None,
        top_classes: int = 10,
        edges_per_class: int = 3,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                "`model` is a TorchScript module; hooks cannot be registered on it. Read out "
                "the eager model."
            )
        if not isinstance(gradient, bool):
            raise TypeError(f"`gradient` must be a bool, got {type(gradient).__name__}.")
        self.model = uncompiled(model)
        network = unwrap_distributed(model)  # names are those of the wrapped network
        self._network = network
        self.gradient = gradient
        self.edges_per_node = check_int(edges_per_node, "edges_per_node")
        self.top_classes = check_int(top_classes, "top_classes")
        self.edges_per_class = check_int(edges_per_class, "edges_per_class")

        if classifier is None:
            self.classifier = find_classifier(network)
        else:
            module = resolve_layer(network, classifier, argument="classifier")
            if isinstance(module, nn.modules.conv._ConvNd) and not is_pointwise_classifier(module):
                raise TypeError(
                    "`classifier` must be an nn.Linear (the final layer) or a 1 x 1 "
                    "convolution (groups=1, no padding) applied to the pooled N x C x 1 x 1 "
                    f"map, got {type(module).__name__} with kernel {tuple(module.kernel_size)}, "
                    f"groups={module.groups}, padding={module.padding}."
                )
            if not isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                raise TypeError(
                    "`classifier` must be an nn.Linear (the final layer) or a 1 x 1 "
                    f"convolution applied to the pooled N x C x 1 x 1 map, got "
                    f"{type(module).__name__}."
                )
            self.classifier = _module_name(network, module, "classifier")

        self._discovered = layers is None
        if layers is None:
            try:
                names = default_stages(network, self.classifier)
            except ValueError as error:
                refusal = _transformer_refusal(network, error)
                if refusal is None:
                    raise
                raise refusal from error
        else:
            if isinstance(layers, nn.ModuleList | nn.ModuleDict):
                raise TypeError(
                    f"`layers` is an nn.{type(layers).__name__}, which does not run as one "
                    "stage; pass its modules as a list, one per stage (list(model.blocks), "
                    "or list(model.blocks.values()) for a ModuleDict)."
                )
            if isinstance(layers, str | nn.Module):  # a lone stage, as PathwayGradient takes
                layers = [layers]
            if not isinstance(layers, Sequence):
                raise TypeError(
                    "`layers` must be a module name or module, or a list of them (one per "
                    f"stage), got {type(layers).__name__}."
                )
            if not layers:
                raise ValueError("`layers` is empty; give at least one stage.")
            names = [
                _module_name(network, resolve_layer(network, layer, argument="layers"), "layers")
                for layer in layers
            ]
            if len(set(names)) != len(names):
                raise ValueError(f"`layers` lists a layer twice: {names}.")
            if self.classifier in names:
                raise ValueError(
                    f"`layers` contains the classifier {self.classifier!r}; its input is "
                    "always the pooled stage."
                )
        clash = {POOLED, CLASS} & set(names)
        if clash:
            raise ValueError(
                f"`layers`: a stage named {sorted(clash)[0]!r} would clash with the "
                "pooled-feature / class nodes; rename the module or pass the stages by another "
                "module."
            )
        self.layers: tuple[str, ...] = tuple(names)
        try:
            connections = find_connections(network, list(names), self.classifier)
        except ValueError as error:
            refusal = _transformer_refusal(network, error)
            if refusal is None:
                raise
            raise refusal from error
        self.connections: tuple[Connection, ...] = tuple(connections)
        self.top_k: tuple[int, ...] = self._parse_top_k(top_k, len(names))
        # what `connections` were found for: `layers` or `classifier` assigned afterwards are
        # refused (the connections, and the default top_k, belong to these)
        self._connected = (self.layers, self.classifier)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a readout pickled before `_connected` was recorded: its connections belong to the
        # stages it had then (read now, once; not to `layers` assigned after loading)
        state = dict(state)
        if "_connected" not in state:
            state["_connected"] = (state.get("layers"), state.get("classifier"))
        self.__dict__.update(state)

    @staticmethod
    def _parse_top_k(top_k: Any, n_stages: int) -> tuple[int, ...]:
        if top_k is None:
            return (_DEFAULT_K_STAGE,) * (n_stages - 1) + (_DEFAULT_K_LAST, _DEFAULT_K_POOLED)
        if type(top_k).__module__ == "numpy" or isinstance(top_k, torch.Tensor):
            top_k = top_k.tolist()  # a numpy or tensor int, or an array of them
        if isinstance(top_k, int) and not isinstance(top_k, bool):
            return (check_int(top_k, "top_k"),) * (n_stages + 1)
        if isinstance(top_k, Sequence) and not isinstance(top_k, str):
            if len(top_k) != n_stages + 1:
                raise ValueError(
                    f"`top_k` has {len(top_k)} entries; expected {n_stages + 1} (one per stage "
                    "and one for the pooled features), or a single int."
                )
            return tuple(check_int(k, "top_k") for k in top_k)
        raise TypeError(
            f"`top_k` must be an int or a sequence of ints, got {type(top_k).__name__}."
        )

    @property
    def stages(self) -> tuple[str, ...]:
        """``layer`` attributes of the nodes in graph order: the stages, "pooled", "class"."""
        return (*self.layers, POOLED, CLASS)

    # ----------------------------------------------------------------------------------

    def _ingress_matrix(
        self, connection: Connection, c_src: int, c_dst: int, like: Tensor, spatial: bool
    ) -> Tensor:
        """(c_dst, c_src) matrix of summed tap L1 norms of the ingress modules.

        ``spatial``: the source stage returns maps (N x C x ...), so a linear layer (or the
        classifier's input) may see them flattened, C x P features with P positions per
        channel (feature f belongs to channel f // P); see :func:`_flattened_l1`.
        """
        destination = connection.destination
        if destination == self.classifier:
            destination = POOLED
        if not connection.ingress:
            if c_src == c_dst:
                return torch.eye(c_dst, dtype=like.dtype, device=like.device)
            if spatial and c_dst % c_src == 0:
                # a flatten straight into the classifier: feature f is one tap (weight 1) of
                # channel f // P, so it is tied to that channel
                positions = c_dst // c_src
                tie = torch.zeros(c_dst, c_src, dtype=like.dtype, device=like.device)
                features = torch.arange(c_dst, device=like.device)
                tie[features, features // positions] = 1
                return tie
            raise ValueError(
                f"`layers`: cannot resolve the connection from layer {connection.source!r} "
                f"to the classifier {self.classifier!r}: {c_src} "
                f"{'channels' if spatial else 'features'} reach {c_dst} features without a "
                "linear layer, and they are not a flattened map of those channels."
            )
        total = None
        for name in connection.ingress:
            module = self._network.get_submodule(name)
            n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            n_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            flattened = (
                isinstance(module, nn.Linear) and spatial and n_in != c_src and n_in % c_src == 0
            )
            if n_in != c_src and not flattened:
                raise ValueError(
                    f"`layers`: cannot resolve the connection from layer {connection.source!r} "
                    f"({c_src} channels) to {destination!r}: its ingress module {name!r} "
                    f"takes {n_in} {'features' if isinstance(module, nn.Linear) else 'channels'}"
                    f"{', not a multiple of the channels' if spatial else ''}."
                )
            if n_out != c_dst:
                continue  # e.g. a bottleneck's first conv: not the stage's channels
            if flattened:
                matrix = _flattened_l1(module, c_src)
            else:
                matrix = _dense_l1(module)
            matrix = matrix.to(device=like.device, dtype=like.dtype)
            total = matrix if total is None else total + matrix
        if total is None and connection.paths:
            total = self._path_matrix(connection, c_src, c_dst, like)
        if total is None:
            raise _NoIngressProduces(
                f"`layers`: cannot resolve the connection from layer {connection.source!r} to "
                f"{destination!r} ({c_dst} channels): none of its ingress modules "
                f"{list(connection.ingress)} produces {c_dst} channels",
                destination,
            )
        return total

    def _path_matrix(
        self, connection: Connection, c_src: int, c_dst: int, like: Tensor
    ) -> Tensor | None:
        """(c_dst, c_src) sum over the connection's series of convolutions (an
        inverted-residual block: expand, depthwise, project) of the product of their tap L1
        matrices, ``|W_k| @ ... @ |W_1|``; None when no series runs from ``c_src`` to
        ``c_dst`` channels."""
        total = None
        for path in connection.paths:
            modules = [self._network.get_submodule(name) for name in path]
            channels = [modules[0].in_channels] + [m.out_channels for m in modules]
            joined = all(
                m.in_channels == channels[i] for i, m in enumerate(modules)
            )  # each conv reads the previous one's channels
            if not joined or channels[0] != c_src or channels[-1] != c_dst:
                continue
            matrix = None
            for module in modules:
                step = _dense_l1(module).to(device=like.device, dtype=like.dtype)
                matrix = step if matrix is None else step @ matrix
            total = matrix if total is None else total + matrix
        return total

    @leaves_inference_mode  # the gradient variant backpropagates (also through the target)
    def readout(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
    ) -> list[nx.DiGraph]:
        r"""The circuit graph of every example, from one batched forward (and backward).

        Called inside ``torch.inference_mode()``, the readout leaves inference mode for the
        call (inputs and targets made there are copied to normal tensors), so that the
        gradient variant can backpropagate; the graphs are those computed outside it.

        Args:
            inputs (Tensor or tuple of Tensor): the batch, ``N x ...`` (N >= 1).
            target (int, list, tensor, optional): the class whose logit is backpropagated
                (``gradient=True``) and that is always among the class nodes; one per
                example or one for all, in any form Captum accepts. Default: the predicted
                class.
            additional_forward_args (Any, optional): passed to the model after the inputs.

        Returns:
            list of networkx.DiGraph: one graph per example, in input order; always a list
            (a single example gives a list of one).

            - nodes ``"<layer>:<channel>"`` with attributes ``layer`` (the stage name,
              ``"pooled"`` or ``"class"``), ``channel`` (int; the class index for class
              nodes), ``energy`` (float; the probability for class nodes), ``stage`` (int
              position in :attr:`stages`), and for class nodes ``logit``; in the gradient
              variant also ``gradient`` (G at that node).
            - edges with attributes ``weight`` (float > 0) and ``kind``:
              ``"weight_activation"``, ``"gradient"`` (the gradient variant) or ``"class"``.
            - graph attributes ``example``, ``target``, ``prediction``, ``gradient``,
              ``stages``.
        """
        self._check_stages()
        _warn_random_graphs(self.model)
        n_stages = len(self.layers)
        # `top_k` as it is now, in the constructor's forms (an int assigned since applies to
        # every stage, as it does given to the constructor)
        top_k = self._parse_top_k(self.top_k, n_stages)
        inputs = in_model_precision(self.model, format_inputs(inputs))
        extra = format_additional_forward_args(additional_forward_args)
        model, network = self.model, self._network
        names = [*self.layers, self.classifier]
        # per stage (the last one: the classifier's input), one (energy, tensor) per call
        records: list[list[tuple[Tensor, Tensor | None]]] = [[] for _ in names]
        spatial = [False] * len(names)  # whether the stage returns maps (N x C x ...)
        gradient = self.gradient
        # (device, stage index or ingress module name) in the order the hooks fire
        fired: list[tuple[Any, int | str]] = []

        def stage_hook(index: int, name: str):
            def hook(module, args, output):
                if not isinstance(output, Tensor) or output.dim() < 2:
                    got = type(output).__name__ if not isinstance(output, Tensor) else "a scalar"
                    raise TypeError(
                        f"`layers`: layer {name!r} returns {got}; a stage must return an "
                        "N x C (x ...) tensor."
                    )
                records[index].append((_energy(output), output if gradient else None))
                fired.append((output.device, index))
                spatial[index] = output.dim() > 2
                # later in-place operations must leave the recorded tensor intact
                return output.clone() if gradient else None

            return hook

        def classifier_hook(module, args):
            if isinstance(module, nn.Linear):
                if not args or not isinstance(args[0], Tensor) or args[0].dim() != 2:
                    raise ValueError(
                        f"`classifier` {self.classifier!r} must receive an N x features tensor "
                        "(the pooled feature vector)."
                    )
            elif (
                not args
                or not isinstance(args[0], Tensor)
                or args[0].dim() < 3
                or any(size != 1 for size in args[0].shape[2:])
            ):
                got = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else "no map"
                raise ValueError(
                    f"`classifier` {self.classifier!r} is a 1 x 1 convolution, so it must "
                    f"receive the pooled N x C x 1 x 1 map (as a linear layer on the pooled "
                    f"features), got {got}."
                )
            # a 1 x 1 convolution's pooled map: its features are its channels
            records[n_stages].append((_energy(args[0].flatten(1)), args[0] if gradient else None))
            fired.append((args[0].device, n_stages))
            return (args[0].clone(), *args[1:]) if gradient else None

        def ingress_hook(name: str):
            def hook(module, args, output):
                fired.append((output.device if isinstance(output, Tensor) else None, name))

            return hook

        # the ingress modules of connections found from module order: checked to run between
        # their stages (registered first: a stage that is itself an ingress module fires after)
        checked = {
            name
            for connection in self.connections
            if connection.method == "module_order"
            for name in connection.ingress
        }
        registrations = [
            call_hook(network.get_submodule(name), ingress_hook(name)) for name in sorted(checked)
        ]
        registrations += [
            call_hook(network.get_submodule(name), stage_hook(i, name))
            for i, name in enumerate(self.layers)
        ]
        classifier = network.get_submodule(self.classifier)
        registrations.append(call_hook(classifier, classifier_hook, pre=True))

        try:
            with (
                preserved_state([model]),
                registered_hooks(*registrations),
            ):
                if gradient:
                    inputs = tuple(
                        t.detach().requires_grad_(True) if t.is_floating_point() else t
                        for t in inputs
                    )
                with gradients_on() if gradient else torch.no_grad():
                    logits = call_model(model, inputs, extra)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise _not_logits(logits)
                calls = [
                    _in_device_order(records[i], name, i == n_stages)
                    for i, name in enumerate(names)
                ]
                self._check_run_order(fired)
                if _classifier_outputs(classifier) != logits.shape[1]:
                    raise ValueError(
                        f"`classifier` {self.classifier!r} has "
                        f"{_classifier_outputs(classifier)} outputs but the model returns "
                        f"{logits.shape[1]} logits."
                    )
                classes, multi = class_selection(
                    target, logits, argument="target", default="predicted"
                )
                if multi:
                    raise ValueError("`target` must give one class per example for a readout.")
                targets = classes[:, 0]
                energies = [torch.cat([e.to(logits.device) for e, _ in call]) for call in calls]
                grads: list[Tensor | None] = [None] * (n_stages + 1)
                if gradient:
                    # every stage's gradient: the first's weighs no edge, but is its nodes'
                    # documented `gradient` attribute
                    wrt = [tensor for call in calls for _, tensor in call]
                    with gradients_on():
                        selected = logits.gather(1, classes).sum()
                    found = list(objective_gradients(selected, wrt, allow_unused=True))
                    for i, call in enumerate(calls):
                        parts = [found.pop(0) for _ in call]
                        if any(part is None for part in parts):
                            raise ValueError(
                                f"`layers`: the target logit does not depend on layer {names[i]!r}."
                            )
                        grads[i] = torch.cat([part.to(logits.device) for part in parts])
                    # a 1 x 1 convolution classifier's pooled map, as the features it holds
                    grads[n_stages] = grads[n_stages].flatten(1)
                with torch.no_grad():
                    return self._graphs(logits.detach(), targets, energies, grads, spatial, top_k)
        except _NoIngressProduces as error:
            # explained here, the hooks removed: its check traces the model with torch.fx
            raise error.explained(network) from None

    def _check_stages(self) -> None:
        """Refuse ``layers`` or ``classifier`` assigned after construction: the connections
        between the stages (and the default ``top_k``) were found for those given then."""
        # (a readout pickled before this was recorded gets it on loading: __setstate__)
        layers, classifier = self._connected
        for argument, now, then in (
            ("layers", self.layers, layers),
            ("classifier", self.classifier, classifier),
        ):
            if now != then and not (argument == "layers" and _same_names(now, then)):
                raise ValueError(
                    f"`{argument}` was changed after construction (to {now!r}, built with "
                    f"{then!r}); the connections between the stages were found for the "
                    f"stages given then. Build a new CircuitReadout(model, {argument}=...)."
                )

    def _check_run_order(self, fired: list[tuple[Any, int | str]]) -> None:
        """Refuse a forward pass whose stages do not run in the order of :attr:`layers`, or
        where an ingress module found from module order does not run between its stages.

        Each connection joins consecutive stages, so stages listed out of their run order
        (for a model that does not trace with ``torch.fx``: modules registered in another
        order than they run) would give edges through the wrong convolutions. ``fired``: per
        hook call, the device and the stage index (the classifier last) or the ingress
        module's name; DataParallel replicas are checked one device at a time."""
        names = [*self.layers, self.classifier]
        stage_calls = [what for _, what in fired if isinstance(what, int)]
        if len(stage_calls) == len(set(stage_calls)):  # one call each (a model split
            sequences = [[what for _, what in fired]]  # over devices too): one order
        else:  # DataParallel: one replica per device, running side by side
            by_device: dict[Any, list[int | str]] = {}
            for device, what in fired:
                by_device.setdefault(device, []).append(what)
            sequences = list(by_device.values())
        from_order = any(c.method == "module_order" for c in self.connections)
        for sequence in sequences:
            stages = [what for what in sequence if isinstance(what, int)]
            if stages != sorted(stages):
                listed, ran = list(names), [names[i] for i in stages]
                if ran[-1] == self.classifier:  # the classifier in its place: not shown
                    listed, ran = listed[:-1], ran[:-1]
                how = (
                    "as listed"
                    if not self._discovered
                    else "as registered (found from module order: the model does not trace "
                    "with torch.fx)"
                    if from_order
                    else "as discovered"
                )
                if self._discovered and from_order:
                    remedy = (
                        "register the model's modules in the order they run (the connections "
                        "come from module order), or make the model traceable by torch.fx"
                    )
                else:
                    remedy = "pass `layers` in the order they run" + (
                        " (without torch.fx the connections come from module order, so the "
                        "modules must also be registered in that order)"
                        if from_order
                        else ""
                    )
                raise ValueError(
                    f"`layers`: the stages do not run in the order listed. {how[0].upper()}"
                    f"{how[1:]}: "
                    f"{listed}; as run in the forward pass: {ran}. Each connection joins "
                    f"consecutive stages, so the graph would join the wrong layers; {remedy}."
                )
            position = {what: p for p, what in enumerate(sequence) if isinstance(what, int)}
            for i, connection in enumerate(self.connections):
                if connection.method != "module_order":
                    continue
                for name in connection.ingress:
                    if i not in position or i + 1 not in position:
                        continue
                    runs = [p for p, what in enumerate(sequence) if what == name]
                    if not any(position[i] < p < position[i + 1] for p in runs):
                        raise ValueError(
                            f"`layers`: the connection from layer {connection.source!r} to "
                            f"layer {connection.destination!r} was found from module order "
                            f"(the model does not trace with torch.fx), but its ingress module "
                            f"{name!r} "
                            f"{'does not run' if not runs else 'does not run between them'} in "
                            "the forward pass, so the graph would join the wrong layers. "
                            "Register the model's modules in the order they run, or make the "
                            "model traceable by torch.fx."
                        )

    def _graphs(
        self,
        logits: Tensor,
        targets: Tensor,
        energies: list[Tensor],
        grads: list[Tensor | None],
        spatial: list[bool],
        top_k: tuple[int, ...],
    ) -> list[nx.DiGraph]:
        n_stages = len(self.layers)
        names = [*self.layers, POOLED]
        device = logits.device
        energy = [e.to(device) for e in energies]
        work = torch.float64 if any(e.dtype == torch.float64 for e in energy) else torch.float32
        energy = [e.to(work) for e in energy]
        like = energy[0]
        size = [e.shape[1] for e in energy]
        gmag = [None if g is None else _energy(g).to(device, work) for g in grads]
        keep = [_stable_top(energy[i], min(top_k[i], size[i])) for i in range(n_stages + 1)]
        n = logits.shape[0]

        # stage -> stage (and last stage -> pooled) edges: (N, k_dst, k_src)
        transitions = []
        for i, connection in enumerate(self.connections):
            matrix = self._ingress_matrix(connection, size[i], size[i + 1], like, spatial[i])
            src, dst = keep[i], keep[i + 1]
            source_energy = energy[i].gather(1, src).unsqueeze(1)
            weights = matrix[dst.unsqueeze(2), src.unsqueeze(1)] * source_energy
            if gmag[i + 1] is not None:
                weights = weights * gmag[i + 1].gather(1, dst).unsqueeze(2)
            order = _stable_top(weights, min(self.edges_per_node, src.shape[1]))
            transitions.append((order, weights.gather(2, order)))

        # pooled -> class edges
        # float64 where the device has it: the other classes of a confident prediction
        probabilities = logits.to(precise_dtype(logits.device)).softmax(dim=1)
        n_classes = logits.shape[1]
        # ranked by logit: the same order as by probability, also where the probabilities of
        # a confident prediction's other classes underflow to 0 (ties broken by index)
        shown = _stable_top(logits.to(work), min(self.top_classes, n_classes))
        missing = (shown != targets.unsqueeze(1)).all(dim=1)
        shown[missing, -1] = targets[missing]
        fc = _classifier_weight(self._network.get_submodule(self.classifier)).to(like.device, work)
        pooled = keep[n_stages]
        class_w = fc.abs()[shown.unsqueeze(2), pooled.unsqueeze(1)]  # (N, T, k)
        if grads[n_stages] is not None:
            target_grad = (
                grads[n_stages].detach().to(device, work).abs().gather(1, pooled)
            )  # (N, k)
            is_target = (shown == targets.unsqueeze(1)).unsqueeze(2)
            class_w = torch.where(is_target, target_grad.unsqueeze(1), class_w)
        class_w = class_w * energy[n_stages].gather(1, pooled).unsqueeze(1)
        class_order = _stable_top(class_w, min(self.edges_per_class, pooled.shape[1]))
        class_vals = class_w.gather(2, class_order)

        # to Python, once
        energy_l = [e.cpu().tolist() for e in energy]
        gmag_l = [None if g is None else g.cpu().tolist() for g in gmag]
        keep_l = [k.cpu().tolist() for k in keep]
        trans_l = [(o.cpu().tolist(), v.cpu().tolist()) for o, v in transitions]
        shown_l, prob_l = shown.cpu().tolist(), probabilities.cpu().tolist()
        logits_l = logits.to(work).cpu().tolist()
        class_order_l, class_vals_l = class_order.cpu().tolist(), class_vals.cpu().tolist()
        targets_l = targets.cpu().tolist()
        predictions_l = logits.argmax(dim=1).cpu().tolist()
        stage_kind = "gradient" if self.gradient else "weight_activation"

        graphs = []
        for b in range(n):
            graph = nx.DiGraph(
                example=b,
                target=int(targets_l[b]),
                prediction=int(predictions_l[b]),
                gradient=self.gradient,
                stages=list(self.stages),
            )
            for i, layer in enumerate(names):
                for c in keep_l[i][b]:
                    attributes = {"layer": layer, "channel": c, "energy": energy_l[i][b][c]}
                    if gmag_l[i] is not None:
                        attributes["gradient"] = gmag_l[i][b][c]
                    graph.add_node(node_id(layer, c), stage=i, **attributes)
            for c in shown_l[b]:
                graph.add_node(
                    node_id(CLASS, c),
                    stage=n_stages + 1,
                    layer=CLASS,
                    channel=c,
                    energy=prob_l[b][c],
                    logit=logits_l[b][c],
                )
            for i, (order, values) in enumerate(trans_l):
                src_ids, dst_ids = keep_l[i][b], keep_l[i + 1][b]
                for r, d in enumerate(dst_ids):
                    for position, weight in zip(order[b][r], values[b][r], strict=True):
                        if weight > 0:
                            graph.add_edge(
                                node_id(names[i], src_ids[position]),
                                node_id(names[i + 1], d),
                                weight=weight,
                                kind=stage_kind,
                            )
            for t, c in enumerate(shown_l[b]):
                for position, weight in zip(class_order_l[b][t], class_vals_l[b][t], strict=True):
                    if weight > 0:
                        graph.add_edge(
                            node_id(POOLED, keep_l[n_stages][b][position]),
                            node_id(CLASS, c),
                            weight=weight,
                            kind="class",
                        )
            graphs.append(graph)
        return graphs
