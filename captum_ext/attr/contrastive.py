"""Contrastive: the contrastive form of any Captum gradient attribution."""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import captum
import torch
from captum.attr import (
    LRP,
    Attribution,
    DataLoaderAttribution,
    DeepLift,
    DeepLiftShap,
    GradientAttribution,
    GradientShap,
    LayerActivation,
    LayerDeepLiftShap,
    LayerFeaturePermutation,
    LayerGradCam,
    LayerGradientShap,
    LLMAttribution,
    LLMGradientAttribution,
    NeuronAttribution,
)
from captum.attr._core.guided_backprop_deconvnet import ModifiedReluGradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .._utils.batched_grad import (
    call_model,
    in_model_precision,
    log_softmax_precise,
    run_forward,
    softmax_complement,
)
from .._utils.caller import user_stacklevel
from .._utils.deprecation import renamed_arguments
from .._utils.hooks import call_hook, registered_hooks
from .._utils.layers import root_module
from .._utils.model_state import detached, leaves_inference_mode, preserved_state
from .._utils.validation import (
    check_class_range,
    check_int,
    check_number,
    format_inputs,
    output_selection,
    outside_inference_mode_nested,
    parse_class_selection,
    refuse_one_output_contrast,
    repeat_per_example,
)
from ..token_grid import looks_channels_last
from ._cam import _token_layout, warn_random_in_train_mode

DEFAULT_ROWS_PER_CALL = 64


def _neg_log_softmax(logits: Tensor) -> Tensor:
    """``-log_softmax(logits, dim=1)`` with the top class's entry exact on confident
    predictions (:func:`~captum_ext._utils.batched_grad.log_softmax_precise`, in at least
    float32): ``CE(z, P)`` of a logit gap of 20 is about 2e-9, not 0, so the perturbation
    methods, which take differences of this value, see the change an occlusion makes."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return (-log_softmax_precise(work, dim=1)).to(logits.dtype)


class _NegLogSoftmax(torch.autograd.Function):
    r"""``-log_softmax(logits, dim=1)`` whose backward keeps ``p_c - 1`` exact.

    torch's backward computes ``p_c * sum(g) - g_c``; for the explained class of a confident
    prediction (``p_P`` rounded to 1 in float32) its ``p_P - 1`` is 0 instead of about
    ``-1e-8``, and the gradient of ``CE(z, P)`` loses its largest term (the map of
    "Q == P" was noise). Written as ``p_c (sum_{j != c} g_j) - g_c (1 - p_c)`` with
    :func:`~captum_ext._utils.batched_grad.softmax_complement`, it is exact to rounding.
    The forward value is exact in the same way (:func:`_neg_log_softmax`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor) -> Tensor:
        return _neg_log_softmax(logits)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (logits,) = ctx.saved_tensors
        precise = logits if logits.dtype == torch.float64 else logits.float()
        p = torch.softmax(precise, dim=1).to(grad.dtype)
        rest = softmax_complement(precise, dim=1).to(grad.dtype)
        others = grad.sum(dim=1, keepdim=True) - grad
        return p * others - grad * rest


class _PairedNegLogSoftmax(torch.autograd.Function):
    r"""``-log_softmax`` whose backward is DeepLift's rescale rule (Shrikumar et al., 2017).

    Used while a DeepLift method runs its paired forward on ``cat([inputs, baselines])``:
    rows ``i`` and ``i + N`` of the (2N, C) logits are an input and its baseline. The
    backward replaces the softmax by the secant softmax of the pair (see
    :func:`_secant_softmax`), so that multipliers times ``z(x) - z(baseline)`` sum exactly to
    ``CE_Q(x) - CE_Q(baseline)``. The forward value is :func:`_neg_log_softmax`'s.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        ctx.save_for_backward(logits)
        return _neg_log_softmax(logits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (logits,) = ctx.saved_tensors
        if logits.shape[0] % 2:
            raise RuntimeError(
                "Contrastive: a DeepLift method ran its paired forward on an odd batch "
                f"({logits.shape[0]} rows); expected inputs and baselines concatenated."
            )
        half = logits.shape[0] // 2
        z, z0 = logits[:half].detach(), logits[half:].detach()
        secant = _secant_softmax(z, z0)
        rest = _secant_complement(z, z0, secant)
        secant = torch.cat([secant, secant]).to(grad.dtype)
        rest = torch.cat([rest, rest]).to(grad.dtype)
        # d(-log softmax_j)/dz_c = p_c - [j == c], with p the secant softmax, written as
        # p_c (sum_{j != c} grad_j) - grad_c (1 - p_c): no 1 - p_c formed by subtraction
        others = grad.sum(dim=1, keepdim=True) - grad
        return secant * others - grad * rest


def _secant_complement(z: Tensor, z0: Tensor, secant: Tensor) -> Tensor:
    r"""``1 - p~`` for the secant softmax ``p~`` of :func:`_secant_softmax`, without the
    cancellation of ``1 - p~_P`` when input and baseline both predict P confidently (``p~_P``
    rounds to 1, and DeepLift's attributions of ``CE_P`` lost their sum). From
    ``sum_c p~_c (z_c - z0_c) = L - L0``:

    .. code-block:: text

        1 - p~_P = (log p_P(z) - log p_P(z0) + sum_{c != P} p~_c (z_c - z0_c)) / (z_P - z0_P)

    with both log-probabilities from :func:`log_softmax_precise`; used for the class of the
    largest ``p~`` where ``|z_P - z0_P| > 1e-3`` (else, and for the others, ``1 - p~``).
    """
    rest = 1 - secant
    top = secant.argmax(dim=1, keepdim=True)
    delta = (z - z0).to(secant.dtype)
    delta_top = delta.gather(1, top)
    log_ratio = (
        log_softmax_precise(z.to(secant.dtype), 1) - log_softmax_precise(z0.to(secant.dtype), 1)
    ).gather(1, top)
    spread = (secant * delta).scatter(1, top, 0.0).sum(dim=1, keepdim=True)
    usable = delta_top.abs() > 1e-3
    stable = (log_ratio + spread) / torch.where(usable, delta_top, 1)
    return rest.scatter(1, top, torch.where(usable, stable, rest.gather(1, top)))


def _one_minus_exp_over(t: Tensor) -> Tensor:
    """(1 - exp(-t)) / t for t >= 0, with its limit 1 at t = 0 (no cancellation)."""
    tiny = t < 1e-12
    safe = torch.where(tiny, torch.ones_like(t), t)
    return torch.where(tiny, torch.ones_like(t), -torch.expm1(-safe) / safe)


def _secant_softmax(z: Tensor, z0: Tensor) -> Tensor:
    r"""DeepLift multipliers of ``logsumexp`` between logits ``z0`` (baseline) and ``z``.

    ``logsumexp(z) = log(sum_c exp(z_c))`` decomposed as element-wise ``exp``, a sum and
    ``log``, each element-wise step with the rescale rule ``(f(b) - f(a)) / (b - a)``:

    .. code-block:: text

        p~_c = (L - L0) / (exp L - exp L0) * (exp z_c - exp z0_c) / (z_c - z0_c)
             = exp(max(z_c, z0_c) - max(L, L0)) * phi(|z_c - z0_c|) / phi(|L - L0|)

    with ``L = logsumexp(z)``, ``phi(t) = (1 - exp(-t)) / t`` (``phi(0) = 1``). Then
    ``sum_c p~_c (z_c - z0_c) = L - L0`` exactly, ``p~ = softmax(z)`` when ``z = z0``, and no
    term overflows however large the logits (``z_c <= L``). Computed in float64 for float64
    logits, else float32.
    """
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z, z0 = z.to(dtype), z0.to(dtype)
    lse, lse0 = torch.logsumexp(z, dim=1, keepdim=True), torch.logsumexp(z0, dim=1, keepdim=True)
    scale = torch.exp(torch.maximum(z, z0) - torch.maximum(lse, lse0))
    return scale * _one_minus_exp_over((z - z0).abs()) / _one_minus_exp_over((lse - lse0).abs())


class ContrastiveForward(nn.Module):
    r"""``x -> -log_softmax(f(x))``: column Q is the per-example cross-entropy with label Q.

    While :class:`Contrastive` explains elements of an output ``(N, C, *positions)`` (a
    segmentation network's), the softmax runs over the class axis at each position and the
    result is flattened to (N, C * P): column ``q * P + j`` is the cross-entropy at position
    ``j`` with label ``q``, the column ``output_selection`` gives the tuple ``(q, *position)``.

    Handing this function to a Captum method with ``target=Q`` makes the method explain
    ``CE(f(x), Q)`` instead of the logit of the target class. It is an ``nn.Module`` holding
    the model as a submodule, so methods that work on a model rather than a function
    (DeepLift, GuidedBackprop) can be built on it too. Layers are named as in the model
    itself: ``layers="features.4"`` and the site names methods report carry no
    ``forward_func.`` prefix.

    Args:
        forward_func (Callable): the model (an ``nn.Module``, a bound ``forward`` or a
            function) returning (N, C) logits.
        output_transform (Callable, optional): reduces the model's output to (N, C) logits.
    """

    def __init__(self, forward_func: Callable, output_transform: Callable | None = None):
        super().__init__()
        self.forward_func = forward_func
        owner = root_module(forward_func)
        if owner is not None and owner is not forward_func:
            self.model = owner  # a bound forward: hold its module, so hooks reach its layers
        self.output_transform = output_transform
        # set by Contrastive for the duration of one attribute call
        self._paired = False
        # True while the model's output has more than two dimensions (a segmentation
        # network's (N, C, H, W)): the cross-entropy at each position, flattened
        self._multidim = False
        self._max_class: int | None = None
        self._inputs = 0  # how many leading arguments are the inputs (cast to a half model's dtype)
        self._calls = 0

    def _captum_ext_user_model(self) -> nn.Module | None:
        """The user's model (None for a plain function): layers are named and looked up in
        it, not with this wrapper's ``forward_func.`` prefix (see ``_utils.layers``)."""
        return root_module(self.forward_func)

    def forward(self, *args: Any) -> Tensor:
        self._calls += 1
        if self._inputs:
            inputs, extra = args[: self._inputs], args[self._inputs :]
            output = call_model(
                self.forward_func, in_model_precision(self.forward_func, inputs), extra
            )
        else:
            output = self.forward_func(*args)
        if self.output_transform is not None:
            output = self.output_transform(output)
        multidim = self._multidim and isinstance(output, Tensor) and output.dim() > 2
        if not multidim and (not isinstance(output, Tensor) or output.dim() != 2):
            raise _output_error(output)
        # one output (a binary model's logit): every cross-entropy over it is 0
        refuse_one_output_contrast(output.shape[1], per_position=multidim)
        if self._max_class is not None and self._max_class >= output.shape[1]:
            check_class_range(torch.tensor([self._max_class]), output.shape[1], argument="contrast")
        # (N, C, *positions): the softmax runs over the class axis at each position, and
        # column c * P + j of the flattened result is CE(output[n, :, j], c), the column
        # `output_selection` gives for the tuple (c, *position)
        if self._paired:
            return _PairedNegLogSoftmax.apply(output).flatten(1)
        return _NegLogSoftmax.apply(output).flatten(1)


def _output_error(output: Any) -> ValueError:
    """The error for a model output that is not (N, C) logits, where ``contrast`` was given
    in a form that names classes only (or an output that is no tensor at all)."""
    if isinstance(output, Tensor) and output.dim() > 2:
        sizes = ", ".join(str(s) for s in output.shape[1:])
        positions = ", ".join(f"i_{a}" for a in range(1, output.dim() - 1))
        if output.dim() == 4:
            positions = "h, w"
        return ValueError(
            f"forward_func returns an output of shape (N, {sizes}), more than (N, classes) "
            "logits: the class axis 1, then positions. On such an output "
            f"`contrast` must name one element per example, as for ContrastCAM: a tuple "
            f"(q, {positions}) (the cross-entropy of the logits at that position with label q) "
            "or a list of N such tuples. A class alone (an int, a list of ints, a tensor, "
            "'all') names no position; for a region's score pass `output_transform` reducing "
            "the output to (N, classes) (e.g. each class's logits summed over a pixel mask)."
        )
    got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    return ValueError(
        f"forward_func must return (N, classes) logits, got {got}; pass "
        "`output_transform` to Contrastive."
    )


def _names_elements(contrast: Any) -> bool:
    """Whether ``contrast`` is Captum's index of elements of an output with more than two
    dimensions: a tuple of several indices, or a list holding such tuples."""
    if isinstance(contrast, tuple):
        return len(contrast) != 1
    return isinstance(contrast, list) and any(
        isinstance(item, tuple) and len(item) != 1 for item in contrast
    )


#: Captum methods whose ``baselines`` are a distribution of any number of references, not
#: one per example: a distribution of N rows must not be repeated and sliced with the inputs
_BASELINE_DISTRIBUTIONS = (DeepLiftShap, GradientShap, LayerDeepLiftShap, LayerGradientShap)

#: Captum methods whose rules are hooks on the model's modules (DeepLift's multipliers,
#: Guided Backprop's and Deconvolution's ReLU rules): a plain function gives them nothing
_MODULE_RULES = (DeepLift, ModifiedReluGradientAttribution)

#: Captum methods that explain no output class, or whose rules stop at the logits.
_REFUSED: tuple[tuple[type, str], ...] = (
    (
        NeuronAttribution,
        "it explains one neuron of a layer, not the model's output, so there is no class "
        "to contrast",
    ),
    (LayerActivation, "it returns a layer's activations and explains no output class"),
    (
        LRP,
        "its relevance rules are defined layer by layer for the logit; the cross-entropy "
        "-log_softmax(f(x))_Q has no LRP rule, so relevance would not be conserved",
    ),
    (
        DataLoaderAttribution,
        "it aggregates over a data loader; wrap the attribution method inside it instead",
    ),
    (
        LayerFeaturePermutation,
        "in Captum 0.9 it fails with any `target` (the target column is selected twice), "
        "and Contrastive always passes the contrast class as the target",
    ),
    (LLMAttribution, "it explains generated text, not (N, classes) logits"),
    (LLMGradientAttribution, "it explains generated text, not (N, classes) logits"),
)


#: keyword arguments of Captum's methods that must be positive ints when given (None, where
#: allowed, is left to the method): checked before the call, by name
_POSITIVE_INTS = ("n_steps", "n_samples", "nt_samples", "perturbations_per_eval")
_POSITIVE_INTS_OR_NONE = ("internal_batch_size", "nt_samples_batch_size")

#: Captum checks some arguments with ``assert``; the argument each message is about (read in
#: this order, first match wins). Other AssertionErrors are re-raised unchanged.
_CAPTUM_ASSERTIONS: tuple[tuple[str, str], ...] = (
    (r"number of steps", "n_steps"),
    (r"^Approximation method", "method"),
    (r"^Noise types", "nt_type"),
    (r"stdevs", "stdevs"),
    (r"^Batch size must be greater than 0", "internal_batch_size"),
    (r"(Ablations|Perturbations) per evaluation", "perturbations_per_eval"),
    (r"^Stride", "strides"),
    (r"[Ss]liding window|Occlusion shape", "sliding_window_shapes"),
    (r"[Bb]aseline", "baselines"),
    (r"feature_mask|[Mm]asks? ", "feature_mask"),
)

_CAPTUM_DIR = os.path.dirname(os.path.abspath(captum.__file__))


@contextmanager
def _captum_argument_errors(method: Attribution) -> Iterator[None]:
    """Turn the AssertionError with which Captum refuses an argument into a ValueError
    naming it (Captum's message included, the AssertionError chained). Only assertions
    raised inside Captum whose message is about a known argument are translated; any other
    AssertionError propagates as it is."""
    try:
        yield
    except AssertionError as error:
        frames = []
        tb = error.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        inside_captum = bool(frames) and os.path.abspath(frames[-1]).startswith(_CAPTUM_DIR)
        message = str(error)
        argument = next(
            (name for pattern, name in _CAPTUM_ASSERTIONS if re.search(pattern, message)), None
        )
        if not inside_captum or argument is None:
            raise
        raise ValueError(
            f"`{argument}`: {type(method).__name__} (Captum) refused the value: {message}"
        ) from error


def _check_captum_arguments(
    kwargs: dict[str, Any], inputs: tuple[Tensor, ...], distribution: bool
) -> None:
    """Check the common keyword arguments of the wrapped Captum method before calling it, so
    that a bad value gets a ValueError/TypeError naming it rather than Captum's bare
    AssertionError or, for baselines with a NaN, a silently all-NaN map."""
    for name in _POSITIVE_INTS:
        if name in kwargs:
            check_int(kwargs[name], name)
    for name in _POSITIVE_INTS_OR_NONE:
        if kwargs.get(name) is not None:
            check_int(kwargs[name], name)
    if "stdevs" in kwargs:
        stdevs = kwargs["stdevs"]
        for i, value in enumerate(stdevs if isinstance(stdevs, tuple) else (stdevs,)):
            where = f"stdevs[{i}]" if isinstance(stdevs, tuple) else "stdevs"
            check_number(value, where, allow_minimum=True)
    if "baselines" in kwargs:
        _check_baselines(kwargs["baselines"], inputs, distribution)


def _check_baselines(baselines: Any, inputs: tuple[Tensor, ...], distribution: bool) -> None:
    """Tensor and number baselines must be finite; unless they are a distribution to draw
    from (GradientShap, DeepLiftShap, ``draw_baseline_from_distrib=True``), a baseline with
    the rank of its input has one row per example or one row for all (Captum's rule)."""
    if baselines is None or (callable(baselines) and not isinstance(baselines, Tensor)):
        return
    given = baselines if isinstance(baselines, tuple) else (baselines,)
    n = inputs[0].shape[0]
    for i, baseline in enumerate(given):
        where = "baselines" if len(given) == 1 else f"baselines[{i}]"
        if isinstance(baseline, Tensor):
            if baseline.is_floating_point() and not bool(torch.isfinite(baseline).all()):
                raise ValueError(f"`{where}` contains NaN or infinite values.")
            if (
                not distribution
                and i < len(inputs)
                and baseline.dim() > 0
                and baseline.dim() == inputs[i].dim()
                and baseline.shape[0] not in (1, n)
            ):
                raise ValueError(
                    f"`{where}` has {baseline.shape[0]} examples but the inputs have {n}; "
                    "give one baseline per example, one for all (a batch of 1), or a scalar."
                )
            if not distribution and i < len(inputs) and not _broadcasts_to(baseline, inputs[i]):
                raise ValueError(
                    f"`{where}` of shape {tuple(baseline.shape)} does not broadcast to its "
                    f"input of shape {tuple(inputs[i].shape)}."
                )
        elif isinstance(baseline, float) and not math.isfinite(baseline):
            raise ValueError(f"`{where}`={baseline!r}: a baseline must be finite.")


def _broadcasts_to(tensor: Tensor, target: Tensor) -> bool:
    try:
        return torch.broadcast_shapes(tensor.shape, target.shape) == target.shape
    except RuntimeError:
        return False


def _refusal(method: type | Attribution) -> str | None:
    for refused, why in _REFUSED:
        if (isinstance(method, type) and issubclass(method, refused)) or isinstance(
            method, refused
        ):
            name = method.__name__ if isinstance(method, type) else type(method).__name__
            return f"Contrastive cannot make {name} contrastive: {why}."
    return None


def _refuse_plain_function(methods: list[type], forward_func: Callable) -> None:
    """Refuse a plain function for methods whose rules hook the model's modules: it has
    none to hook (DeepLift's result would silently be a gradient)."""
    if methods and root_module(forward_func) is None:
        name = methods[0].__name__
        raise TypeError(
            f"`forward_func`: {name} applies its rules to the model's modules (hooks on its "
            f"ReLUs), and a plain function has none to hook: its result would be a gradient, "
            f"not {name}. Pass the nn.Module (or its bound forward)."
        )


def _methods_in(method: Attribution) -> list[Attribution]:
    """``method`` and the Captum methods it holds (NoiseTunnel, GuidedGradCam, LayerIG)."""
    found = [method]
    for value in vars(method).values():
        if isinstance(value, Attribution):
            found.extend(_methods_in(value))
    return found


def _feature_axis_warning(
    shape: tuple[int, ...], input_shape: tuple[int, ...], method: str, where: str
) -> str | None:
    """The warning for Captum's LayerGradCam (inside ``method``) on activations of ``shape``
    that look like a transformer's tokens (N, tokens, D) or a channels-last grid
    (N, h, w, C) for images of ``input_shape``, detected as the CAMs detect them; None for
    any other shape. A heuristic (a spectrogram network pooling over frequency, a Conv1d
    over image rows can match it), so a warning, not a refusal.

    LayerGradCam sums the weighted activations over dimension 1, whatever it holds: on
    tokens the "map" runs over the embedding, on a channels-last grid over (w, C)."""
    if len(input_shape) != 4:
        return None
    tokens = _token_layout(shape, input_shape)
    if tokens is not None:
        leading, (rows, columns) = tokens
        lead = {0: "", 1: "a class token and ", 2: "2 leading tokens and "}[leading]
        what = (
            f"a transformer's tokens ({lead}{rows} x {columns} patches of {shape[2]} "
            f"features). Captum's LayerGradCam reads them as {shape[1]} channels along one "
            f"dimension of length {shape[2]}; if they are tokens, the map runs over the "
            "embedding, not the image."
        )
        fold = f"lambda t: t[:, {leading}:].transpose(1, 2).unflatten(2, ({rows}, {columns}))"
    elif looks_channels_last(shape, tuple(input_shape[2:])):
        what = (
            f"a channels-last grid ({shape[1]} x {shape[2]} positions of {shape[3]} features, "
            "as a Swin transformer's stages give). Captum's LayerGradCam reads it as "
            f"{shape[1]} channels of {shape[2]} x {shape[3]} maps; if it is channels-last, "
            "the map runs over the features, not the image."
        )
        fold = "lambda t: t.permute(0, 3, 1, 2)"
    else:
        return None
    return (
        f"Contrastive({method}): `layer` {where} of shape {shape} for images of shape "
        f"{input_shape}, which looks like {what} Captum's LayerGradCam takes no "
        "`reshape_transform`; if so, use captum_ext's Grad-CAM, which does: "
        "Contrastive(GradCAM, model, layer).attribute(inputs, contrast, "
        f"reshape_transform={fold}, relu_attributions=False) (the same map on an "
        "N x C x h x w layer; relu_attributions=True is ContrastCAM(model, "
        "layer).attribute(inputs, contrast, reshape_transform=...))."
    )


@contextmanager
def _layer_cam_guard(
    method: Attribution, input_shape: tuple[int, ...], layer_input: bool
) -> Iterator[list[str]]:
    """Collect, from a forward hook on its layer, the warnings for activations that look like
    a transformer's tokens or a channels-last grid, which a Captum LayerGradCam inside
    ``method`` (itself, or within NoiseTunnel / GuidedGradCam) reads as channels
    (:func:`_feature_axis_warning`); yields the list of distinct messages, for the caller to
    warn of at the user's line. No hook without such a method. The layer methods whose
    attributions have the layer's own shape (LayerIntegratedGradients, LayerConductance,
    ...) are not CAMs and are left alone."""
    messages: list[str] = []
    cams = [m for m in _methods_in(method) if isinstance(m, LayerGradCam)]
    layers = {id(m.layer): m.layer for m in cams if isinstance(m.layer, nn.Module)}
    if not layers or len(input_shape) != 4:
        yield messages
        return
    name = type(method).__name__
    where = "receives inputs" if layer_input else "outputs activations"

    def check(module: nn.Module, args: tuple, output: Any) -> None:
        seen = args if layer_input else output
        for tensor in seen if isinstance(seen, tuple | list) else (seen,):
            if isinstance(tensor, Tensor):
                message = _feature_axis_warning(tuple(tensor.shape), input_shape, name, where)
                if message is not None and message not in messages:
                    messages.append(message)

    registrations = [call_hook(layer, check) for layer in layers.values()]
    with registered_hooks(*registrations):
        yield messages


def _swap_forward(method: Attribution, forward: ContrastiveForward, originals: tuple) -> Any:
    """A copy of ``method`` in which the model is replaced by ``forward`` everywhere.

    Every attribute that is the model (``forward_func``, DeepLift's and GuidedBackprop's
    ``model``) becomes ``forward``; every Captum method it holds (NoiseTunnel's inner method,
    GuidedGradCam's Grad-CAM and guided backprop, LayerIntegratedGradients' ``ig``) is
    swapped the same way; lists and dicts (hook handles) are copied so that the given
    instance is never modified. ``layer`` is left alone.
    """
    swapped = copy.copy(method)
    for name, value in vars(method).items():
        if name == "layer":
            continue
        if isinstance(value, Attribution):
            setattr(swapped, name, _swap_forward(value, forward, originals))
        elif any(value is original for original in originals):
            setattr(swapped, name, forward)
        elif isinstance(value, (list, dict, set)):
            setattr(swapped, name, copy.copy(value))
    return swapped


class Contrastive(GradientAttribution):
    r"""Make any Captum gradient attribution contrastive: "Why P, rather than Q?".

    The wrapped method explains the per-example cross-entropy with the contrast class Q as
    label, by receiving the forward function ``x -> -log_softmax(f(x))`` and ``target=Q``:

    .. code-block:: text

        explained scalar  CE(f(x), Q) = -log softmax(f(x))_Q
        its gradient      d CE / d x = J^T (softmax(f(x)) - onehot(Q))

    the signal ContrastCAM backpropagates. On an output with more than two dimensions,
    ``(N, C, *positions)`` (a segmentation network's ``(N, C, H, W)``), ``contrast`` takes the forms
    ContrastCAM takes, ``(q, h, w)`` or a list of N such tuples, and the explained scalar is
    ``CE(f(x)[n, :, h, w], q)``, the softmax over the classes at that pixel (as in
    ContrastCAM, the tuple is read by the same helper).

    Sign: a positive attribution is evidence against Q (it raises the loss of predicting Q),
    i.e. evidence for the class the network prefers over Q.
    ``Contrastive(LayerGradCam, model, layer)`` with ``relu_attributions=True`` (Captum's
    default is False) equals ``ContrastCAM(model, layer)``, also on such outputs.

    How: the method is rebuilt on :class:`ContrastiveForward`, an ``nn.Module`` that holds
    the model as a submodule; every reference of the method to the model (its
    ``forward_func``, the ``model`` DeepLift and GuidedBackprop hook, the inner methods of
    NoiseTunnel, GuidedGradCam and LayerIntegratedGradients) points to it. The given
    instance is copied, never modified. Works with Saliency, InputXGradient,
    IntegratedGradients, GradientShap, GuidedBackprop, Deconvolution, GuidedGradCam,
    DeepLift, DeepLiftShap, the layer methods (LayerGradCam, LayerDeepLift(Shap),
    LayerIntegratedGradients, LayerConductance, ...), the perturbation methods
    (FeatureAblation, Occlusion, ShapleyValueSampling, Lime, KernelShap, ...), our
    LayerGradCamPlusPlus, and NoiseTunnel around any of them. Refused at construction, with a
    TypeError naming the method: neuron methods and LayerActivation (no output class to
    contrast), LRP / LayerLRP (no rule for the cross-entropy), LayerFeaturePermutation
    (fails with any target in Captum 0.9), DataLoaderAttribution and the LLM attributions.
    A method that never calls the contrastive forward raises a RuntimeError rather than
    returning a non-contrastive result. Captum's LayerGradCam (alone, in NoiseTunnel or in
    GuidedGradCam) on a layer that looks like a transformer's tokens (N, tokens, D) or a
    channels-last (N, h, w, C) grid (a Swin stage), detected as the CAMs detect them, runs
    with a UserWarning: it sums over dimension 1, so on such a layer its map would run over
    the features; ``Contrastive(GradCAM, model, layer)`` takes the ``reshape_transform``
    that folds them into N x C x h x w. The layer methods whose
    attributions have the layer's shape (LayerIntegratedGradients, LayerConductance, ...)
    explain such layers as they are.

    DeepLift methods: the final ``-log_softmax`` gets DeepLift's rescale rule, applied to
    ``logsumexp(z) - z_Q`` written as element-wise exp, a sum and a log. Its multipliers
    (a "secant softmax" of the input's and the baseline's logits) equal softmax(z) when the
    two coincide, and make the attributions sum exactly to
    ``CE_Q(x) - CE_Q(baseline)`` (Captum's ``return_convergence_delta=True`` reports the
    rounding error). Captum's own treatment of a function it has no rule for (the plain
    gradient) would not.

    Paper: Prabhushankar, Kwon, Temel & AlRegib, "Contrastive Explanations in Neural
    Networks", ICIP 2020.

    Args:
        method (type or Attribution): a Captum attribution class or instance.
        forward_func (Callable, optional): the model, when ``method`` is a class; it is
            constructed as ``method(forward_func, *args, **kwargs)``. Must be None when
            ``method`` is an instance (its own forward_func is used).
        *args: further positional constructor arguments of ``method`` (e.g. the layer).
        **kwargs: further keyword constructor arguments of ``method``.
        output_transform (Callable, optional): reduces the model's output to (N, C) logits.

    Examples::

        >>> from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
        >>> from captum_ext.attr import Contrastive
        >>> ig = Contrastive(IntegratedGradients, model)
        >>> attr = ig.attribute(images, contrast=3, n_steps=32)
        >>> smooth = Contrastive(NoiseTunnel(Saliency(model)))
        >>> attr = smooth.attribute(images, nt_type="smoothgrad", nt_samples=8)
        >>> per_class = Contrastive(Saliency, model).attribute(images, contrast="all")
    """

    #: the keyword ``attribute`` takes the class as (as on the CAMs: ContrastCAM's is
    #: "contrast" too), read by the sanity checks, which hand their classes to it
    _class_argument = "contrast"

    def __init__(
        self,
        method: type | Attribution,
        forward_func: Callable | None = None,
        *args: Any,
        output_transform: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        refusal = _refusal(method)
        if refusal is not None:
            raise TypeError(refusal)
        if isinstance(method, Attribution):
            if forward_func is not None or args or kwargs:
                raise TypeError(
                    "`method` is already an instance: do not pass forward_func or constructor "
                    "arguments to Contrastive."
                )
            instance = method
        elif isinstance(method, type) and issubclass(method, Attribution):
            if forward_func is None:
                raise TypeError("`forward_func` is required when `method` is a class.")
            if issubclass(method, _MODULE_RULES):  # before Captum's own AssertionError
                _refuse_plain_function([method], forward_func)
            instance = method(forward_func, *args, **kwargs)
        else:
            raise TypeError(
                f"`method` must be a Captum Attribution class or instance, got "
                f"{type(method).__name__}."
            )
        if isinstance(instance, Contrastive):
            raise TypeError("`method` is already Contrastive.")
        for inner in _methods_in(instance):
            refusal = _refusal(inner)
            if refusal is not None:
                raise TypeError(refusal)
        self.model_forward = instance.forward_func
        hooked = [type(m) for m in _methods_in(instance) if isinstance(m, _MODULE_RULES)]
        _refuse_plain_function(hooked, self.model_forward)
        self.contrastive_forward = ContrastiveForward(self.model_forward, output_transform)
        originals = (self.model_forward, root_module(self.model_forward))
        self.method = _swap_forward(
            instance, self.contrastive_forward, tuple(o for o in originals if o is not None)
        )
        # DeepLift differentiates a paired forward (inputs and baselines in one batch)
        self._paired = any(isinstance(m, DeepLift) for m in _methods_in(self.method))
        GradientAttribution.__init__(self, self.model_forward)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.method.multiplies_by_inputs

    @property
    def layer(self) -> Any:
        """The wrapped layer method's ``layer`` (None for a method of the inputs)."""
        return getattr(self.method, "layer", None)

    def has_convergence_delta(self) -> bool:
        return self.method.has_convergence_delta()

    @log_usage()
    @renamed_arguments(max_batch="batch_size")
    @leaves_inference_mode
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        contrast: Any = None,
        additional_forward_args: Any = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> Any:
        r"""Attributions of the cross-entropy with the contrast class(es) Q.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            contrast (int, list, tuple, Tensor or str, optional): the class Q: an int, one
                per example (list or 1-D tensor), ``"all"``, or a 2-D selection of several
                classes per example. Default: None, each example's runner-up class. For a
                model output with more than two dimensions (a segmentation network's
                (N, C, H, W)), the forms ContrastCAM takes: ``(q, h, w)`` (the same element
                for every example) or a list of N such tuples, explaining
                ``CE(output[n, :, h, w], q)``, the softmax taken over the classes at that
                pixel; there is no default there. A per-example ``contrast`` of length N is
                expanded with the inputs inside NoiseTunnel, ``infidelity`` and
                ``sensitivity_max``.
            additional_forward_args (Any, optional): extra arguments of the model.
                Tensors whose first dimension is N, also nested in tuples, lists, mappings
                and dataclasses, are repeated with the (example, class) rows; the wrapped
                Captum method then expands only top-level tensors with its steps or
                samples, so pass per-example tensors at the top level with
                IntegratedGradients, NoiseTunnel and the like.
            batch_size (int, optional): with several classes per example, the (example,
                class) pairs are stacked into a batch of N * C' rows and handed to the
                wrapped method in calls of at most ``batch_size`` rows. Default: 64.
                (Formerly ``max_batch``, which still works with a DeprecationWarning.)
            **kwargs: any other argument of the wrapped method's ``attribute`` (baselines,
                n_steps, nt_type, ...). Per-example tensors are expanded with the rows.
                ``target`` is refused unless None (the class is ``contrast``: the wrapped
                method's target is set to it).
                Checked before the call: ``n_steps``, ``n_samples``, ``nt_samples`` and
                ``perturbations_per_eval`` must be positive ints, ``internal_batch_size`` and
                ``nt_samples_batch_size`` None or positive ints, ``stdevs`` finite and
                >= 0; tensor and number ``baselines`` must be finite and, unless they are a
                distribution to draw from (GradientShap, DeepLiftShap,
                ``draw_baseline_from_distrib=True``), broadcast to their input, and a
                baseline tensor with the rank of its input must have 1 or N rows.

        Raises:
            ValueError: an argument above is invalid, or Captum refused an argument with
                an AssertionError (its message is kept, and the argument named).

        Returns:
            What the wrapped method returns for ``target=Q``; with several classes per
            example each tensor gets a class dimension after the batch: (N, C', ...).
        """
        # target=None, the default of the other methods, passes (as with ContrastCAM): code
        # that calls every explainer with target=None runs Contrastive too
        if kwargs.pop("target", None) is not None:
            raise TypeError(
                "Contrastive takes the contrast class as `contrast`, not `target` (the wrapped "
                "method's target is set to it); only target=None is accepted."
            )
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size")
        formatted = format_inputs(inputs)
        # tensors from a serving pipeline (made under inference_mode) go to the wrapped Captum
        # method, which differentiates through them: normal copies
        additional_forward_args = outside_inference_mode_nested(additional_forward_args)
        kwargs = outside_inference_mode_nested(kwargs)
        # baselines a method samples from (GradientShap, DeepLiftShap, or any method with
        # draw_baseline_from_distrib) are a distribution of any size, not one per example
        distribution = bool(kwargs.get("draw_baseline_from_distrib")) or isinstance(
            self.method, _BASELINE_DISTRIBUTIONS
        )
        _check_captum_arguments(kwargs, formatted, distribution)
        model = root_module(self.model_forward)
        warn_random_in_train_mode(f"Contrastive({type(self.method).__name__})", model)
        unwrap = not isinstance(inputs, tuple)
        forward = self.contrastive_forward
        with preserved_state([model], hidden_model=model is None):
            classes = multi = None
            max_class = None
            multidim = False
            if contrast is not None and not isinstance(contrast, str):
                if not _names_elements(contrast):
                    # explicit classes: no extra forward; the range is checked against the
                    # number of outputs by the contrastive forward the method calls
                    classes, multi = parse_class_selection(
                        contrast, formatted[0].shape[0], formatted[0].device, argument="contrast"
                    )
                    if classes.numel():
                        max_class = int(classes.max())
                    if classes.numel() and int(classes.min()) < 0:
                        classes = None  # negative indices count from the last class: need C
            if classes is None:
                # the runner-up, every class, negative indices, or elements of an output of
                # more than two dimensions: one forward for the output
                with torch.no_grad():
                    output = run_forward(
                        self.model_forward,
                        formatted,
                        additional_forward_args,
                        forward.output_transform,
                        allow_multidim=True,
                    )
                if output.dim() < 2:
                    raise _output_error(output)
                # ContrastCAM's reading of the forms (one place): for (N, C) logits the
                # classes, for (N, C, *positions) columns of the flattened cross-entropy
                classes, multi = output_selection(
                    contrast, output, argument="contrast", default="runner_up"
                )
                multidim = output.dim() > 2
                max_class = None
            # Captum's Saliency and GuidedBackprop switch requires_grad on for the tensors
            # they get (with a warning that the input did not require gradients) and only
            # switch it back on success: hand them detached views that already require it.
            formatted = tuple(
                t.detach().requires_grad_() if t.is_floating_point() else t.detach()
                for t in formatted
            )
            calls = forward._calls
            forward._paired, forward._max_class = self._paired, max_class
            forward._inputs, forward._multidim = len(formatted), multidim
            layer_input = bool(kwargs.get("attribute_to_layer_input", False))
            guard = _layer_cam_guard(self.method, tuple(formatted[0].shape), layer_input)
            layout_warnings: list[str] = []  # warned of at the user's line, also on failure
            try:
                with guard as layout_warnings, _captum_argument_errors(self.method):
                    if not multi:
                        result = self.method.attribute(
                            formatted[0] if unwrap else formatted,
                            target=classes[:, 0],
                            additional_forward_args=additional_forward_args,
                            **kwargs,
                        )
                    else:
                        result = self._attribute_many(
                            formatted, classes, additional_forward_args, batch_size, unwrap, kwargs
                        )
            finally:
                forward._paired, forward._max_class, forward._inputs = False, None, 0
                forward._multidim = False
                for message in layout_warnings:
                    warnings.warn(message, stacklevel=user_stacklevel())
        if forward._calls == calls:
            raise RuntimeError(
                f"{type(self.method).__name__} never called the contrastive forward function: "
                "it evaluates the model some other way, so its result would not be "
                "contrastive. Contrastive cannot wrap this method."
            )
        # the views required gradients: a method that multiplies by them (IG, InputXGradient)
        # would hand back a graph over our copies, which the caller can neither use nor free
        return detached(result)

    def _attribute_many(
        self, formatted, classes, additional_forward_args, batch_size, unwrap, kwargs
    ):
        n, per_example = classes.shape
        total = n * per_example
        rows_per_call = DEFAULT_ROWS_PER_CALL if batch_size is None else batch_size
        flat_targets = classes.reshape(-1)
        # baselines a method samples from (GradientShap, also inside NoiseTunnel, or any
        # method with draw_baseline_from_distrib) are a distribution, not one per example
        distribution = bool(kwargs.get("draw_baseline_from_distrib")) or isinstance(
            self.method, _BASELINE_DISTRIBUTIONS
        )
        inner = [m for m in _methods_in(self.method)[1:] if isinstance(m, _BASELINE_DISTRIBUTIONS)]
        if inner and not distribution:
            # NoiseTunnel(GradientShap): Captum's NoiseTunnel takes N-row baselines as one per
            # example and the inner method samples from all of them; stacked (example, class)
            # rows would each sample only from their own example's row
            baselines = kwargs.get("baselines")
            given = baselines if isinstance(baselines, tuple) else (baselines,)
            if any(isinstance(b, Tensor) and b.dim() > 0 and b.shape[0] > 1 for b in given):
                raise ValueError(
                    "`baselines`: with several classes per example, "
                    f"{type(self.method).__name__} around {type(inner[0]).__name__} would "
                    "draw each (example, class) row's baselines from that example's row "
                    "only. Pass draw_baseline_from_distrib=True (the baselines are then a "
                    "distribution), or explain one class per call."
                )

        def repeated(key: str, value: Any, rows: slice) -> Any:
            if key == "baselines" and distribution:
                return value
            return _repeat_batch_shaped(value, formatted, n, per_example, rows)

        pieces = []
        for start in range(0, total, rows_per_call):
            rows = slice(start, min(start + rows_per_call, total))
            chunk_inputs = repeat_per_example(formatted, n, per_example, rows)
            result = self.method.attribute(
                chunk_inputs[0] if unwrap else chunk_inputs,
                target=flat_targets[rows],
                additional_forward_args=repeat_per_example(
                    additional_forward_args, n, per_example, rows
                ),
                **{key: repeated(key, value, rows) for key, value in kwargs.items()},
            )
            pieces.append(result)
        return _join(pieces, n, per_example)


def _repeat_batch_shaped(
    value: Any, inputs: tuple[Tensor, ...], n: int, per_example: int, rows: slice
) -> Any:
    """:func:`repeat_per_example` for the tensors of ``value`` that have the examples first,
    as Captum reads them: the rank of their input (``baselines``, ``feature_mask``) and N
    rows. A broadcastable ``(C, H, W)`` baseline of 3 images has N rows too, but is one
    baseline for all, and stays as it is."""
    if isinstance(value, tuple) and len(value) == len(inputs):
        return tuple(
            _repeat_batch_shaped(item, (x,), n, per_example, rows) for item, x in zip(value, inputs)
        )
    if isinstance(value, Tensor) and value.dim() != inputs[0].dim():
        return value
    return repeat_per_example(value, n, per_example, rows)


def _join(pieces: list, n: int, per_example: int) -> Any:
    first = pieces[0]
    if isinstance(first, Tensor):
        joined = torch.cat(pieces) if len(pieces) > 1 else first
        if joined.dim() == 0 or joined.shape[0] != n * per_example:
            return joined
        return joined.reshape(n, per_example, *joined.shape[1:])
    if isinstance(first, tuple):
        return tuple(_join([p[i] for p in pieces], n, per_example) for i in range(len(first)))
    return pieces
