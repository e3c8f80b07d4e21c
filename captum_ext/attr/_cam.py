"""Shared machinery of the class-activation-map methods (private).

For a layer with activations A (K x u x v) and a backward signal G = d s / d A of a per-class
scalar s (a logit, or the cross-entropy with a contrast class):

    Grad-CAM weights    alpha_k = mean_(u,v) G_k
    Grad-CAM++ weights  alpha_k = sum_(u,v) a_kuv * ReLU(G_kuv),
                        a_kuv = G_kuv^2 / (2 G_kuv^2 + sum_(i,j) A_kij * G_kuv^3)
    map                 ReLU( sum_k alpha_k A_k )
                        (attr_dim_summation=False: ReLU( alpha_k A_k ) per channel)

``gradient_sign`` chooses which part of G enters the channel weights (Khakzar, Baselizadeh
& Navab, "Rethinking positive aggregation and propagation of gradients in gradient-based
saliency methods", 2020): ``"signed"`` uses G as it is, ``"positive"`` only ReLU(G):

    Grad-CAM weights    signed: mean_(u,v) G_k           positive: mean_(u,v) ReLU(G_k)
    Grad-CAM++ weights  signed: sum_(u,v) a_kuv G_kuv    positive: sum_(u,v) a_kuv ReLU(G_kuv)

None is each method's published choice: signed for Grad-CAM's weighting, positive for
Grad-CAM++'s. CounterfactualCAM weights the negated gradient G = -d z_P / d A, and the sign
applies to that G.

All classes requested for a batch come from one forward pass through the shared engine
(``captum_ext._utils.batched_grad``); the maps are formed chunk by chunk so memory stays at
the size of the maps.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import GradientAttribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .._utils.batched_grad import check_grad_kwargs, class_gradients
from .._utils.caller import keyword_only_forward_error, user_stacklevel
from .._utils.hooks import AttentionLayerOutput, call_hook, registered_hooks
from .._utils.layers import (
    quantized_note,
    resolve_layer,
    root_module,
    spatial_layer_candidates,
    user_model,
)
from .._utils.maps import check_normalize, minmax_normalize, upsample_maps
from .._utils.validation import check_flag, format_additional_forward_args, format_inputs
from ..token_grid import looks_channels_last
from ._docs import with_cam_args

WEIGHTINGS = ("gradcam", "gradcam++")

#: the values of ``attribute(..., gradient_sign=)`` other than None (the published choice)
GRADIENT_SIGNS = ("signed", "positive")


def check_weighting(weighting: Any) -> None:
    """Refuse a ``weighting`` other than those of :data:`WEIGHTINGS` (at construction, and at
    each call: the public attribute may have been assigned since)."""
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting`={weighting!r}: expected one of {WEIGHTINGS}.")


def check_gradient_sign(gradient_sign: Any) -> None:
    """Refuse a ``gradient_sign`` other than None or one of :data:`GRADIENT_SIGNS` (before
    the model runs)."""
    if gradient_sign is not None and (
        not isinstance(gradient_sign, str) or gradient_sign not in GRADIENT_SIGNS
    ):
        raise ValueError(
            f"`gradient_sign`={gradient_sign!r}: expected None (the method's published "
            "choice), 'signed' (the gradients as they are) or 'positive' (only their "
            "positive part enters the channel weights)."
        )


def gradcam_weights(gradients: Tensor, activations: Tensor, positive: bool = False) -> Tensor:
    """(N, B, K, *S) gradients -> (N, B, K) channel weights: the spatial mean (of the
    gradients' positive part with ``positive``)."""
    if positive:
        gradients = torch.relu(gradients)
    if gradients.dim() <= 3:
        return gradients
    return gradients.mean(dim=tuple(range(3, gradients.dim())))


def gradcam_plus_plus_weights(
    gradients: Tensor, activations: Tensor, positive: bool = True
) -> Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al., WACV 2018, eq. 19 with exp scores):
    ``sum a * ReLU(G)``, or ``sum a * G`` without ``positive`` (the signed aggregation)."""
    aggregated = torch.relu(gradients) if positive else gradients
    if gradients.dim() <= 3:
        return aggregated
    spatial = tuple(range(3, gradients.dim()))
    sum_activations = activations.sum(dim=tuple(range(2, activations.dim())))  # (N, K)
    sum_activations = sum_activations.reshape(*sum_activations.shape, *([1] * len(spatial)))
    # alpha = g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g) where g != 0: the g^2 cancels
    # (formed as written, g^2 underflows for |g| below about 1e-19 in float32 and a
    # confident prediction's maps, whose gradients are that small, came out all zero)
    denominator = 2 + sum_activations.unsqueeze(1) * gradients
    usable = (gradients != 0) & (denominator != 0)
    alpha = torch.where(usable, 1 / torch.where(usable, denominator, 1), 0)
    return (alpha * aggregated).sum(dim=spatial)


def _reshaped_activations(reshape_transform, activations: Tensor) -> Tensor:
    """The layer's activations through ``reshape_transform`` (as they are without one)."""
    if reshape_transform is None:
        return activations
    reshaped = reshape_transform(activations)
    if not isinstance(reshaped, Tensor):
        raise TypeError("`reshape_transform` must return a tensor.")
    return reshaped


def _reshaped_gradients(reshape_transform, gradients: Tensor, rows_kept: bool = False) -> Tensor:
    """(A_0, B, *A[1:]) gradients (the engine's layout: the class axis inserted at dimension
    1 of the layer's activations A, whatever their layout) -> (N, B, *reshaped): each class's
    gradient goes through ``reshape_transform`` as the activations do, so a transform written
    for a tokens-first (tokens, N, D) layer applies as it is.

    ``rows_kept``: the transform kept the activations' rows (A_0 rows in, A_0 out: a
    batch-first layer). Then the transform is called once on all B classes' gradients
    stacked along the rows, (B * A_0, *A[1:]), where a row-wise transform (any B rows to B
    rows) returns B * A_0 rows, split back per class: one call per chunk instead of one per
    class. A transform that returns another number of rows there, raises (one written
    for exactly N rows), or gives the first or the last class other values than a call of
    its own (a transform that is not row-wise: it normalises over the batch), is called per
    class as before."""
    if reshape_transform is None:
        return gradients
    rows, classes = gradients.shape[:2]
    if rows_kept and classes > 1:
        stacked = gradients.transpose(0, 1).flatten(0, 1)  # class-major: row b * A_0 + a
        try:
            reshaped = reshape_transform(stacked)
        except Exception:  # noqa: BLE001 -- not row-wise: per class below
            reshaped = None
        if (
            isinstance(reshaped, Tensor)
            and reshaped.dim()
            and reshaped.shape[0] == stacked.shape[0]
        ):
            split = reshaped.unflatten(0, (classes, rows)).transpose(0, 1)
            # a transform that keeps the row count without being row-wise (it normalises
            # over the batch, or reads row 0) gives other values stacked than per class:
            # the first and the last class are compared with their own calls
            if all(
                torch.equal(split[:, b], _reshaped_activations(reshape_transform, gradients[:, b]))
                for b in (0, classes - 1)
            ):
                return split
    per_class = [_reshaped_activations(reshape_transform, gradients[:, b]) for b in range(classes)]
    return torch.stack(per_class, dim=1)


class NoSpatialDimensions(ValueError):
    """The CAM layer's output has no spatial dimensions (raised by the reducer)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        super().__init__(
            f"`layer` outputs activations of shape {shape} without spatial dimensions; a CAM "
            "layer must output N x K x h x w (or tokens with a `reshape_transform` to that)."
        )


class TokenActivations(ValueError):
    """The CAM layer's output looks like a vision transformer's tokens (N, tokens, D) while the
    inputs are images: read as channels along one dimension, the map would run over the
    embedding, not the image (raised by the reducer). ``layer_shape``: the layer's own
    output shape where the tokens came out of the user's ``reshape_transform``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        input_shape: tuple[int, ...],
        leading: int,
        grid: tuple[int, int],
        *,
        layer_shape: tuple[int, ...] | None = None,
    ):
        self.shape = shape
        rows, columns = grid
        lead = {0: "", 1: "a class token and ", 2: "2 leading tokens and "}[leading]
        tokens = f"a transformer's tokens ({lead}{rows} x {columns} patches of {shape[2]} features)"
        reading = (
            f"which a CAM would read as {shape[1]} channels along one dimension of length "
            f"{shape[2]}, so the map would run over the embedding, not the image."
        )
        expected = (shape[0], shape[2], rows, columns)
        if layer_shape is not None:
            example = ""
            skip = layer_shape[1] - rows * columns if len(layer_shape) == 3 else -1
            if layer_shape[0] == shape[0] and 0 <= skip <= 2:  # batch-first tokens
                example = (
                    f", e.g. lambda t: t[:, {skip}:].transpose(1, 2).unflatten(2, "
                    f"({rows}, {columns}))"
                )
            super().__init__(
                f"`reshape_transform` returned a tensor of shape {shape} for the layer's "
                f"output of shape {layer_shape} (images of shape {input_shape}): still {tokens}, "
                f"{reading} It must return N x D x h x w, here {expected}: fold the patch "
                f"tokens into their {rows} x {columns} grid{example}."
            )
            return
        fold = f"lambda t: t[:, {leading}:].transpose(1, 2).unflatten(2, ({rows}, {columns}))"
        super().__init__(
            f"`layer` outputs activations of shape {shape} for images of shape {input_shape}: "
            f"{tokens}, {reading} Pass "
            f"`reshape_transform` folding the patch tokens into N x D x h x w (here "
            f"`reshape_transform={fold}`), or explain the `.grid` of "
            "`captum_ext.token_grid.expose_token_grid(model, layer, example)`."
        )


class ChannelsLastActivations(ValueError):
    """The CAM layer's output is a channels-last grid (N, h, w, C) (a Swin stage): read as
    (N, C, h, w), the map would run over (w, C), not the image (raised by the reducer).
    ``layer_shape``: the layer's own output shape where the grid came out of the user's
    ``reshape_transform``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        input_shape: tuple[int, ...],
        *,
        layer_shape: tuple[int, ...] | None = None,
    ):
        self.shape = shape
        grid = (
            f"a channels-last grid ({shape[1]} x {shape[2]} positions of {shape[3]} features, "
            "as a Swin transformer's stages give), which a CAM would read as "
            f"{shape[1]} channels of {shape[2]} x {shape[3]} maps, so the map would run over "
            "the features, not the image."
        )
        if layer_shape is not None:
            super().__init__(
                f"`reshape_transform` returned a tensor of shape {shape} for the layer's "
                f"output of shape {layer_shape} (images of shape {input_shape}): {grid} It "
                f"must return N x C x h x w, here {(shape[0], shape[3], shape[1], shape[2])}: "
                "end it with .permute(0, 3, 1, 2)."
            )
            return
        super().__init__(
            f"`layer` outputs activations of shape {shape} for images of shape {input_shape}: "
            f"{grid} Pass `reshape_transform=lambda t: "
            "t.permute(0, 3, 1, 2)`, or explain the module that permutes the stage's output "
            "to N x C x h x w (torchvision's Swin: `permute`)."
        )


def _token_layout(
    shape: tuple[int, ...], input_shape: tuple[int, ...] | None
) -> tuple[int, tuple[int, int]] | None:
    """``(leading, (h, w))`` when activations of ``shape`` (N, T, D) are a grid of patch
    tokens (after 0-2 leading tokens) that tiles 2-D inputs of ``input_shape`` with square
    patches of at least 2 pixels (H / h == W / w); else None. (An (N, C, L) layer of a model
    that reads images row by row does not tile them so.)"""
    if len(shape) != 3 or input_shape is None or len(input_shape) != 4:
        return None
    height, width = input_shape[2:]
    for leading in (1, 0, 2):
        patches = shape[1] - leading
        for rows in range(1, math.isqrt(max(patches, 0)) + 1):
            if patches % rows:
                continue
            for h, w in ((rows, patches // rows), (patches // rows, rows)):
                if height % h or width % w:
                    continue
                if height // h == width // w >= 2:
                    return leading, (h, w)
    return None


def _half_precision_note(model: nn.Module | None) -> str:
    """For a model with float16 or bfloat16 parameters, the likelier cause of zero
    gradients, first."""
    halves = {
        p.dtype
        for p in (model.parameters() if model is not None else ())
        if p.dtype in (torch.float16, torch.bfloat16)
    }
    if not halves:
        return ""
    dtype = str(sorted(halves, key=str)[0]).replace("torch.", "")
    return (
        f"The model runs in {dtype}, where the gradients of a confident prediction's "
        "cross-entropy or probability (a contrast with the predicted class, say) often round "
        "to zero (below float16's smallest number, or lost to bfloat16's 8-bit mantissa): "
        "explain a float32 copy (copy.deepcopy(model).float()) to see them. "
    )


def zero_gradient_warning(method: str, where: str, model: nn.Module | None = None) -> str:
    """The warning for gradients that are exactly zero at the explained layer for every input:
    every gradient-weighted map is then zero, which says nothing about the input. A
    quantized ``model`` is named first: its quantized layers are then the cause."""
    quantized = quantized_note(model)
    if quantized:
        return (
            f"{method}: the gradients at {where} output are exactly zero for every input, so "
            f"every map is zero. {quantized}"
        )
    half = _half_precision_note(model)
    cause = "Otherwise the scores" if half else "The scores"
    return (
        f"{method}: the gradients at {where} output are exactly zero for every input, so "
        f"every map is zero. {half}{cause} explained do not depend on the layer. After a vision "
        "transformer's last block only the class token is read (explain the block's first "
        "norm instead, `encoder.layers.encoder_layer_<last>.ln_1` in torchvision, "
        "`blocks[-1].norm1` in timm), and a freshly built torchvision ViT has an all-zero head "
        "(load trained weights). A layer inside `torch.utils.checkpoint(..., "
        "use_reentrant=True)` gets no gradients either: use `use_reentrant=False` or turn "
        "activation checkpointing off while explaining. Nor does a layer that the model runs "
        "under `torch.no_grad()` (a frozen backbone inside `forward`) or whose output it "
        "detaches: explain a layer after that point, or lift the `no_grad` while explaining."
    )


#: class names of the modules that, besides torch's dropout, drop random parts of their input
#: in train mode: torchvision's ``torchvision.ops.StochasticDepth``, timm's ``DropPath``,
#: ``DropBlock2d`` and ``PatchDropout``, and the ``DropBlock`` of other libraries (compared by
#: name: no library is needed to read a model that has none)
_STOCHASTIC_DEPTH_CLASSES = (
    "StochasticDepth",
    "DropPath",
    "DropBlock2d",
    "DropBlock",
    "PatchDropout",
)
# compared case-insensitively: the dropblock package's DropBlock2D as timm's DropBlock2d
_STOCHASTIC_DEPTH_NAMES = frozenset(name.lower() for name in _STOCHASTIC_DEPTH_CLASSES) | {
    "dropblock3d"
}
#: the drop probabilities those modules keep, under the names their libraries give them
_DROP_PROBABILITY_ATTRIBUTES = ("p", "drop_prob", "prob")
#: timm's convention for a model (or block) that drops at random in its own ``forward``,
#: with ``F.dropout(x, p=self.drop_rate, training=self.training)`` (the head dropout of its
#: ResNets, EfficientNets and ConvNeXts): no dropout module shows it
_DROP_RATE_ATTRIBUTES = ("drop_rate", "drop_path_rate")


def _positive_rate(value: Any) -> bool:
    """Whether ``value`` is a drop probability above zero (a bool or anything else is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _random_draw_label(name: str, module: nn.Module) -> str | None:
    """How the warning names ``module`` (at ``name``) when it drops random parts of its
    input at each forward pass, else None: a dropout (``torch.nn.modules.dropout._DropoutNd``)
    or stochastic-depth / DropBlock module in train mode with a drop probability other than
    zero (its quoted name), or a module in train mode with a positive ``drop_rate`` or
    ``drop_path_rate`` attribute, timm's functional dropout (its name and the attribute)."""
    if not module.training:
        return None
    label = repr(name or type(module).__name__)
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return None if module.p == 0 else label
    if any(cls.__name__.lower() in _STOCHASTIC_DEPTH_NAMES for cls in type(module).__mro__):
        rate = next(
            (getattr(module, a) for a in _DROP_PROBABILITY_ATTRIBUTES if hasattr(module, a)), None
        )
        return None if isinstance(rate, (int, float)) and rate == 0 else label
    for attribute in _DROP_RATE_ATTRIBUTES:
        rate = getattr(module, attribute, None)
        if _positive_rate(rate):
            return f"{label} ({attribute}={rate:g})"
    return None


def _draws_random_masks(module: nn.Module) -> bool:
    """Whether ``module`` drops random parts of its input at each forward pass (see
    :func:`_random_draw_label`)."""
    return _random_draw_label("", module) is not None


class RandomMapsWarning(UserWarning):
    """The methods' warning that the model is in train mode with dropout, DropBlock or
    stochastic depth active, so that its maps (or scores) are random (given once per model).
    Its own category, so that Monte Carlo dropout, where the randomness is intended, can
    silence it with ``warnings.filterwarnings("ignore", category=RandomMapsWarning)``."""


#: the models :func:`warn_random_in_train_mode` has warned about (weakly held: a model
#: freed is forgotten). Python's once-per-line deduplication cannot do this: the package's
#: own ``warnings.catch_warnings`` blocks reset it, so a loop warned at every call.
_MODELS_WARNED_RANDOM: weakref.WeakSet = weakref.WeakSet()


def random_in_train_mode_warning(
    method: str, model: nn.Module | None, results: str = "maps"
) -> str | None:
    """The warning for a ``model`` left in train mode with dropout, DropBlock or stochastic
    depth active (:func:`_random_draw_label`): each forward pass draws new masks, so the
    ``results`` (``"maps"``, or ``"scores"`` for a metric) differ from call to call. None
    for a model in eval mode, one without such modules, or no model (a plain function as
    ``forward_func``, whose model cannot be read)."""
    if model is None:
        return None
    random = [
        label
        for name, module in user_model(model).named_modules()
        if (label := _random_draw_label(name, module)) is not None
    ]
    if not random:
        return None
    shown = ", ".join(random[:3]) + (", ..." if len(random) > 3 else "")
    return (
        f"{method}: the model is in train mode, where its dropout or stochastic-depth "
        f"modules ({shown}) drop random parts of the activations at every forward pass, so "
        f"the {results} are random: two calls on the same inputs give different {results}. "
        "Call model.eval() first (or pass a model in eval mode); the model's mode is left as "
        "it is. This warning is given once per model. If the randomness is intended (Monte "
        "Carlo dropout), silence it with warnings.filterwarnings('ignore', "
        "category=RandomMapsWarning) (from captum_ext.attr import RandomMapsWarning)."
    )


def warn_random_in_train_mode(method: str, model: nn.Module | None, results: str = "maps") -> None:
    """Give :func:`random_in_train_mode_warning` as a :class:`RandomMapsWarning` pointing at
    the user's line, once per model (a loop of calls on one model, as Monte Carlo dropout
    makes, gets one warning; another model gets its own). The model is the one the user
    built (:func:`user_model`): a method that runs it inside a wrapper of ours (Contrastive's
    ContrastiveForward) and the wrapper's own inner method warn once between them."""
    if model is None:
        return
    model = user_model(model)
    if _warned_random(model):
        return
    message = random_in_train_mode_warning(method, model, results)
    if message is None:
        return
    warnings.warn(RandomMapsWarning(message), stacklevel=user_stacklevel())
    try:
        _MODELS_WARNED_RANDOM.add(model)
    except TypeError:  # no weak reference or no hash: warned at each call
        pass


def _warned_random(model: nn.Module) -> bool:
    """Whether :func:`warn_random_in_train_mode` has warned about ``model`` already."""
    try:
        return model in _MODELS_WARNED_RANDOM
    except TypeError:  # a module that overrides __eq__ without __hash__
        return False


def _attention_neighbours(
    model: nn.Module, attention: nn.Module, run: Callable[[], Any]
) -> tuple[str | None, str | None]:
    """``(producer, block)`` for an ``nn.MultiheadAttention`` ``attention`` of ``model``,
    read during ``run()`` (one forward pass): the name of the module whose output tensor is
    the query it receives (its input: ``ln_1`` in a torchvision ViT block), and of the
    closest module holding it whose output is a tensor (the block); None where there is
    none (the input comes from a function, not a module)."""
    names = {id(m): n for n, m in user_model(model).named_modules() if n}
    outputs: list[tuple[Tensor, str]] = []  # in completion order: innermost first
    tensor_outputs: set[str] = set()
    producers: list[str | None] = []

    def on_output(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor) and id(module) in names:
            outputs.append((output, names[id(module)]))
            tensor_outputs.add(names[id(module)])

    def on_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs.get("query")
        if not producers:
            producers.append(next((n for t, n in outputs if t is query), None))

    registrations = [
        call_hook(m, on_output)
        for m in user_model(model).modules()
        if id(m) in names and not isinstance(m, torch.jit.ScriptModule)
    ]
    registrations.append(call_hook(attention, on_attention, pre=True, with_kwargs=True))
    with registered_hooks(*registrations), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run()
        except Exception:  # noqa: BLE001 -- what ran before the error was recorded
            pass
    name = names.get(id(attention), "")
    parents = [name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)]
    block = next((parent for parent in parents if parent in tensor_outputs), None)
    return (producers[0] if producers else None), block


def _attention_suggestion(producer: str | None, block: str | None) -> str:
    """The sentence naming the modules :func:`_attention_neighbours` found ("" for none)."""
    named = []
    if producer is not None:
        named.append(f"`layer`={producer!r} (its input)")
    if block is not None:
        named.append(f"`layer`={block!r} (the block holding it)")
    return f" Here: {' or '.join(named)}." if named else ""


def make_cam_reducer(
    weight_fn: Callable[[Tensor, Tensor], Tensor],
    relu: bool,
    reshape_transform: Callable | None,
    attr_dim_summation: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> Callable:
    """``reduce(gradients, activations)`` for the engine: (N, B, K, *S) gradients -> maps.

    ``weight_fn(gradients, activations)`` turns (N, B, K, *S) gradients into (N, B, K)
    channel weights (the only part in which the CAMs differ).

    The maps are (N, B, *S), or with ``attr_dim_summation=False`` the per-channel weighted
    activations (N, B, K, *S) (Captum's LayerGradCam convention for that flag).

    ``input_shape``: the inputs' shape (N, C, *spatial), to refuse a transformer's tokens
    given without ``reshape_transform`` (:class:`TokenActivations`).
    """

    def reduce(gradients: tuple[Tensor, ...], activations: tuple[Tensor, ...]):
        maps = []
        for grad, act in zip(gradients, activations):
            layer_shape = tuple(act.shape)
            act = _reshaped_activations(reshape_transform, act)
            if act.dim() < 3:
                raise NoSpatialDimensions(tuple(act.shape))
            tokens = _token_layout(tuple(act.shape), input_shape)
            if tokens is not None:
                raise TokenActivations(
                    tuple(act.shape),
                    input_shape,
                    *tokens,
                    layer_shape=layer_shape if reshape_transform is not None else None,
                )
            if (
                input_shape is not None
                and len(input_shape) == 4
                and looks_channels_last(tuple(act.shape), tuple(input_shape[2:]))
            ):
                raise ChannelsLastActivations(
                    tuple(act.shape),
                    input_shape,
                    layer_shape=layer_shape if reshape_transform is not None else None,
                )
            grad = _reshaped_gradients(
                reshape_transform, grad, rows_kept=act.shape[0] == layer_shape[0]
            )
            if not reduce.saw_gradient:  # the gradients the maps are made of
                reduce.saw_gradient = bool(grad.ne(0).any())
            weights = weight_fn(grad, act)
            if attr_dim_summation:
                cam = torch.einsum("nbk,nk...->nb...", weights, act)
            else:
                cam = torch.einsum("nbk,nk...->nbk...", weights, act)
            maps.append(torch.relu(cam) if relu else cam)
        return tuple(maps)

    reduce.saw_gradient = False  # any non-zero gradient at the layer, over every chunk
    return reduce


def _suggestion_hint(close: list[tuple[str, tuple[int, ...]]], input_shape: tuple[int, ...]) -> str:
    """The sentence naming the suggested layers; a token layer (its tokens tile the images
    of ``input_shape``, :func:`_token_layout`) is marked as such, with the
    ``reshape_transform`` that folds its patch tokens."""
    names, fold = [], ""
    for name, shape in close:
        grid = _token_layout(shape, input_shape)
        names.append(repr(name) if grid is None else f"{name!r} (tokens {shape})")
        if grid is not None and not fold:
            leading, (rows, columns) = grid
            fold = (
                " A token layer needs the reshape_transform that folds its patch tokens, here "
                f"lambda t: t[:, {leading}:].transpose(1, 2).unflatten(2, ({rows}, {columns}))."
            )
    return (
        " The closest layers with spatial output before it (whose activations reach the "
        f"output): {', '.join(names)}.{fold}"
    )


class ClassActivationMapBase(LayerAttribution, GradientAttribution):
    """Template of the CAMs: validation, engine call, reduction and upsampling.

    A CAM chooses its backward signal with class attributes (``_score``: the per-class scalar
    differentiated, ``"logit"`` or ``"cross_entropy"``; ``_class_argument`` and
    ``_default_classes``: the public name of the classes and their default) and writes only
    its channel weights in :meth:`_channel_weights`. The public ``attribute`` of the CAMs
    that explain Captum's ``target`` is installed by :func:`target_cam`.
    """

    _score = "logit"
    _default_classes = "predicted"
    _class_argument = "target"

    def __init__(
        self,
        forward_func: Callable,
        layer: Any,
        device_ids: list[int] | None = None,
        *,
        weighting: str = "gradcam",
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        layer = resolve_layer(forward_func, layer)
        check_weighting(weighting)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self.weighting = weighting
        self.output_transform = output_transform

    def _no_spatial_error(
        self,
        shape: tuple[int, ...],
        inputs: tuple[Tensor, ...],
        additional_forward_args: Any,
        layer_input: bool,
        reshape_transform: Callable | None,
    ) -> ValueError:
        """The error for a layer without spatial output, naming the closest spatial layers."""
        from .._utils.batched_grad import run_forward
        from .._utils.model_state import preserved_state

        model = root_module(self.forward_func)
        name = type(self).__name__
        where = "input" if layer_input else "output"
        label = type(self.layer).__name__
        hint = ""
        if model is not None:
            label = next((n for n, m in model.named_modules() if m is self.layer), label)
            try:
                with preserved_state([model]):
                    close = spatial_layer_candidates(
                        model,
                        lambda: run_forward(
                            self.forward_func,
                            inputs,
                            additional_forward_args,
                            self.output_transform,
                            allow_multidim=True,
                        ),
                        self.layer,
                    )
            except Exception:  # the suggestion is a courtesy; the error below stands
                close = []
            if close:
                hint = _suggestion_hint(close, tuple(inputs[0].shape))
        shaping = " after `reshape_transform`" if reshape_transform is not None else ""
        return ValueError(
            f"{name}: `layer`={label!r} has an {where} of shape {shape}{shaping}, without "
            "spatial dimensions; a CAM layer must output N x K x h x w activations (a "
            "convolutional layer or block, or tokens with a `reshape_transform` to "
            f"N x K x h x w).{hint}"
        )

    def _attention_output_error(
        self,
        error: AttentionLayerOutput,
        inputs: tuple[Tensor, ...],
        additional_forward_args: Any,
    ) -> TypeError:
        """``error`` (the layer is an ``nn.MultiheadAttention``) with the names of the modules
        to explain instead, read from one more forward pass where the model can be named."""
        from .._utils.batched_grad import run_forward
        from .._utils.model_state import preserved_state

        model = root_module(self.forward_func)
        if model is None:
            return error
        try:
            with preserved_state([model]), torch.enable_grad():
                producer, block = _attention_neighbours(
                    model,
                    self.layer,
                    lambda: run_forward(
                        self.forward_func,
                        inputs,
                        additional_forward_args,
                        self.output_transform,
                        allow_multidim=True,
                    ),
                )
        except Exception:  # noqa: BLE001 -- the suggestion is a courtesy; the error stands
            return error
        return error.with_suggestion(_attention_suggestion(producer, block))

    def _keyword_only_error(
        self, error: TypeError, inputs: tuple[Tensor, ...], additional_forward_args: Any
    ) -> TypeError | None:
        """The clear error where ``error`` is Python's refusal of the positional inputs by a
        model whose ``forward`` takes only keyword arguments; None for any other TypeError."""
        model = root_module(self.forward_func)
        layer_name = None
        if model is not None:
            layer_name = next(
                (n for n, m in user_model(model).named_modules() if m is self.layer and n), None
            )
        extra = format_additional_forward_args(additional_forward_args)
        return keyword_only_forward_error(
            self.forward_func, error, len(inputs) + len(extra), layer_name=layer_name
        )

    def _channel_weights(
        self, gradients: Tensor, activations: Tensor, gradient_sign: str | None = None
    ) -> Tensor:
        """(N, B, K, *S) gradients and (N, K, *S) activations -> (N, B, K) channel weights.

        ``gradient_sign``: None (the weighting's published choice: signed for Grad-CAM,
        positive for Grad-CAM++), ``"signed"`` or ``"positive"``."""
        check_weighting(self.weighting)  # also a value assigned after construction
        if self.weighting == "gradcam++":
            positive = gradient_sign != "signed"
            return gradcam_plus_plus_weights(gradients, activations, positive=positive)
        return gradcam_weights(gradients, activations, positive=gradient_sign == "positive")

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def has_convergence_delta(self) -> bool:
        return False

    def _maps(
        self,
        inputs: Any,
        classes: Any,
        additional_forward_args: Any,
        attribute_to_layer_input: bool,
        relu_attributions: bool,
        reshape_transform: Callable | None,
        upsample_to_input: bool,
        normalize: str | None,
        max_batch: int | None,
        attr_dim_summation: bool = True,
        grad_kwargs: dict[str, Any] | None = None,
        interpolate_mode: str | None = None,
        gradient_sign: str | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        check_normalize(normalize)
        check_weighting(self.weighting)  # before the model runs: assigned after construction
        check_gradient_sign(gradient_sign)
        name = type(self).__name__
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError("`reshape_transform` must be callable (tokens -> N x K x h x w).")
        for argument, flag in (
            ("attr_dim_summation", attr_dim_summation),
            ("attribute_to_layer_input", attribute_to_layer_input),
            ("relu_attributions", relu_attributions),
            ("upsample_to_input", upsample_to_input),
        ):
            check_flag(flag, argument)
        if interpolate_mode is not None and not upsample_to_input:
            raise ValueError(
                "`interpolate_mode` applies to the upsampling; pass upsample_to_input=True "
                "with it (or resize the maps yourself with captum's "
                "LayerAttribution.interpolate(maps, size, interpolate_mode=...), whose default "
                "is 'nearest' where upsample_to_input's is linear: 'linear', 'bilinear' or "
                "'trilinear' for 1-D, 2-D or 3-D maps)."
            )
        grad_kwargs = check_grad_kwargs(grad_kwargs, method=name)
        weights = self._channel_weights
        if gradient_sign is not None:  # only then: a subclass's (gradients, activations)
            _check_takes_gradient_sign(weights, name, gradient_sign)
            weights = functools.partial(weights, gradient_sign=gradient_sign)
        formatted = format_inputs(inputs)
        reduce = make_cam_reducer(
            weights,
            relu_attributions,
            reshape_transform,
            attr_dim_summation,
            input_shape=tuple(formatted[0].shape),
        )
        warn_random_in_train_mode(name, root_module(self.forward_func))
        try:
            computed = class_gradients(
                self.forward_func,
                formatted,
                classes,
                layer=self.layer,
                layer_input=attribute_to_layer_input,
                score=self._score,
                additional_forward_args=additional_forward_args,
                output_transform=self.output_transform,
                max_batch=max_batch,
                reduce=reduce,
                class_argument=self._class_argument,
                default_classes=self._default_classes,
                grad_kwargs=grad_kwargs,
                allow_multidim=True,
                reshape_transform=reshape_transform,
            )
        except (TokenActivations, ChannelsLastActivations) as error:
            # the reducer's own message says what to do; the engine's frames do not help
            raise error.with_traceback(None) from None
        except AttentionLayerOutput as error:
            raise self._attention_output_error(
                error, formatted, additional_forward_args
            ).with_traceback(None) from None
        except NoSpatialDimensions as error:
            raise self._no_spatial_error(
                error.shape,
                formatted,
                additional_forward_args,
                attribute_to_layer_input,
                reshape_transform,
            ) from None
        except TypeError as error:
            clear = self._keyword_only_error(error, formatted, additional_forward_args)
            if clear is None:
                raise
            raise clear from None
        every_map_explained = self._check_explained(computed.logits, computed.classes)
        if not reduce.saw_gradient and not every_map_explained:
            warnings.warn(
                zero_gradient_warning(name, "the layer's", root_module(self.forward_func)),
                stacklevel=user_stacklevel(),
            )
        maps = computed.result
        lead = 2 if attr_dim_summation else 3  # (N, C'[, K]) before the spatial dims
        if upsample_to_input:
            size = tuple(formatted[0].shape[2:])
            maps = tuple(_upsample(m, lead, size, interpolate_mode) for m in maps)
        if normalize == "minmax":
            maps = tuple(minmax_normalize(m, start_dim=lead) for m in maps)
        if not attr_dim_summation and not computed.multi:
            maps = tuple(m.squeeze(1) for m in maps)  # (N, K, *S), as LayerGradCam
        return maps[0] if len(maps) == 1 else maps

    def _check_explained(self, logits: Tensor, classes: Tensor) -> bool:
        """Called with the logits and the (N, C') classes explained once the maps are
        computed: a subclass warns here about maps its formula makes meaningless, and
        returns True where that warning covers every example (then the generic "zero
        gradients at the layer" warning, which blames the model, is not given)."""
        return False


def _check_takes_gradient_sign(weights: Callable, name: str, gradient_sign: str) -> None:
    """Refuse ``gradient_sign`` for a subclass whose ``_channel_weights(gradients,
    activations)`` has no ``gradient_sign`` keyword (an override written for the two
    arguments), before the model runs."""
    try:
        parameters = inspect.signature(weights).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    if any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "gradient_sign" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    ):
        return
    raise TypeError(
        f"{name}: `gradient_sign`={gradient_sign!r} is not supported: its "
        "`_channel_weights(gradients, activations)` takes no `gradient_sign` keyword. "
        "Leave `gradient_sign` out (None), or give the override a "
        "`gradient_sign: str | None = None` keyword and apply it there."
    )


def _upsample(maps: Tensor, lead: int, size: tuple[int, ...], mode: str | None) -> Tensor:
    """``upsample_to_input``: (N, C'[, K], *s) maps resized to ``size`` by
    :func:`~captum_ext._utils.maps.upsample_maps` (the linear modes in float64, equal pixels
    kept equal: a CAM at a 1 x 1 layer stays one constant, not rounding noise that deletion
    would rank), in the maps' dtype."""
    if lead == 2 or maps.dim() <= lead:
        return upsample_maps(maps, size, mode)
    flat = upsample_maps(maps.flatten(1, lead - 1), size, mode)
    return flat.unflatten(1, maps.shape[1:lead])


class TargetClassCAMBase(ClassActivationMapBase):
    """A CAM explaining the class(es) given by Captum's ``target`` (default: the prediction).

    Subclasses fix the weighting with the class attribute ``_weighting`` (or override
    ``_channel_weights``) and get their public ``attribute`` from :func:`target_cam`.

    An override is ``_channel_weights(self, gradients, activations)``, (N, B, K, *S)
    gradients and (N, K, *S) activations -> (N, B, K) channel weights, optionally with a
    keyword ``gradient_sign: str | None = None`` (``"signed"`` or ``"positive"``; None, the
    method's published choice). ``gradient_sign`` is passed only where the caller of
    ``attribute`` gives one; an override without the keyword then raises a TypeError
    naming ``gradient_sign``.
    """

    _weighting = "gradcam"

    def __init__(
        self,
        forward_func: Callable,
        layer: Any,
        device_ids: list[int] | None = None,
        *,
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__(
            forward_func,
            layer,
            device_ids,
            weighting=self._weighting,
            output_transform=output_transform,
        )


def _target_cam_attribute(
    self,
    inputs: Tensor | tuple[Tensor, ...],
    target: Any = None,
    additional_forward_args: Any = None,
    attribute_to_layer_input: bool = False,
    relu_attributions: bool = True,
    reshape_transform: Callable | None = None,
    upsample_to_input: bool = False,
    normalize: str | None = None,
    max_batch: int | None = None,
    attr_dim_summation: bool = True,
    grad_kwargs: dict[str, Any] | None = None,
    interpolate_mode: str | None = None,
    *,
    gradient_sign: str | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """The ``attribute`` of every target-class CAM; see :func:`target_cam`."""
    return self._maps(
        inputs,
        target,
        additional_forward_args,
        attribute_to_layer_input,
        relu_attributions,
        reshape_transform,
        upsample_to_input,
        normalize,
        max_batch,
        attr_dim_summation,
        grad_kwargs,
        interpolate_mode,
        gradient_sign,
    )


# Indented as a method's docstring (8 spaces), to match the shared argument texts of _docs.
_TARGET_CAM_DOC = """{summary}

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            {target_arg}
            {cam_args}

        {cam_returns}
        """

_TARGET_CAM_INIT_ARGS = """
        forward_func (Callable or nn.Module): the model, returning (N, C) logits, or an
            output with more than two dimensions (a segmentation network's (N, C, H, W)),
            whose elements Captum's tuple targets select (see docs/segmentation.md).
        layer (nn.Module or str): the layer to explain, or its dotted name.
        device_ids (list[int], optional): as in Captum's layer methods.
        output_transform (Callable, optional): reduces the model's output to (N, C) scores
            (a dict, a tuple; or a segmentation output summed over a pixel mask).
"""


def target_cam(
    summary: str, *, init_args: str | None = None, target_arg: str | None = None
) -> Callable[[type], type]:
    """Class decorator: give a :class:`TargetClassCAMBase` subclass its public ``attribute``.

    The method is the shared template above with the full signature (what ``help()`` and
    Sphinx show), its docstring opening with ``summary`` (the class docstring's
    ``{init_args}`` slot receives the shared constructor arguments), and a code object renamed to
    ``<Class>.attribute`` so that Python's own messages about its arguments (an unknown
    keyword, a missing ``inputs``) name the public class rather than a base.

    A method whose arguments differ from the shared texts (FinerCAM takes (N, C) logits
    only, not a segmentation output) gives its own: ``init_args`` for the class docstring's
    ``{init_args}`` slot, ``target_arg`` for ``attribute``'s ``target`` (both indented as
    the shared texts are).
    """

    def decorate(cls: type) -> type:
        template = _target_cam_attribute
        qualname = f"{cls.__name__}.attribute"
        code = template.__code__.replace(co_name="attribute", co_qualname=qualname)
        function = types.FunctionType(
            code, template.__globals__, "attribute", template.__defaults__
        )
        function.__kwdefaults__ = template.__kwdefaults__
        function.__annotations__ = dict(template.__annotations__)
        function.__module__ = cls.__module__
        function.__qualname__ = qualname
        function.__doc__ = _TARGET_CAM_DOC.replace("{summary}", summary)
        if target_arg is not None:
            function.__doc__ = function.__doc__.replace("{target_arg}", target_arg.strip())
        if cls.__doc__:
            shared = _TARGET_CAM_INIT_ARGS if init_args is None else init_args
            cls.__doc__ = cls.__doc__.replace("{init_args}", shared.strip())
        cls.attribute = log_usage()(with_cam_args(function))
        return cls

    return decorate
