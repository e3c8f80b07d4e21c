"""VOICE: the uncertainty of an explanation, as the variance of its contrastive explanations."""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import GuidedBackprop, LayerGradCam, NoiseTunnel, Saliency
from captum.log import log_usage
from torch import Tensor, nn

from .._utils.batched_grad import (
    class_gradients,
    log_softmax_precise,
    run_forward,
    softmax_complement,
)
from .._utils.caller import user_stacklevel
from .._utils.hooks import call_hook, registered_hooks
from .._utils.layers import quantized_note, root_module, user_model
from .._utils.maps import minmax_normalize, upsample_maps
from .._utils.model_state import leaves_inference_mode, preserved_state
from .._utils.precision import float64_here_or_cpu
from .._utils.seeding import as_generator, content_keys, example_normal, seed_from
from .._utils.summaries import compact_repr
from .._utils.validation import (
    check_int,
    check_number,
    class_selection,
    format_inputs,
    repeat_per_example,
    single_logit_hint,
)
from ._cam import (
    ClassActivationMapBase,
    _half_precision_note,
    gradcam_weights,
    make_cam_reducer,
    warn_random_in_train_mode,
    zero_gradient_warning,
)
from ._voice_moments import UpsampledMoments
from .counterfactual_cam import CounterfactualCAM
from .finer_cam import FinerCAM
from .pathway_gradient import hidden_activation_counts

POSTPROCESS = ("reference", "raw")


@dataclass
class VOICEResult:
    """Per-example output of :meth:`VOICE.attribute` (all tensors batch first).

    Attributes:
        explanation: the explanation of P (the predicted class, or ``target`` when given),
            post-processed like the contrasts.
        contrast: the contrastive explanation against Q2, the runner-up class.
        uncertainty: population variance over the contrast classes Q != P of the
            contrastive explanations, min-max normalised to [0, 1] per example.
        iou: (N,) IoU of the explanation and the uncertainty thresholded at ``threshold``.
        snr: (N,) mean / std of the uncertainty map (0 where it is constant).
        log_likelihood: (N,) log softmax of the logits at P (float64).
        prediction: (N,) the predicted class (argmax of the logits).
        target: (N,) the explained class P: ``target`` when given, else the prediction.
        contrast_class: (N,) Q2, the most likely class other than P (the runner-up).
        n_contrasts: (N,) how many contrast classes entered the variance.
    """

    explanation: Tensor
    contrast: Tensor
    uncertainty: Tensor
    iou: Tensor
    snr: Tensor
    log_likelihood: Tensor
    prediction: Tensor
    target: Tensor
    contrast_class: Tensor
    n_contrasts: Tensor

    def __repr__(self) -> str:
        # the shapes and dtypes, not the values: a batch's maps printed in full are
        # hundreds of lines
        return compact_repr(self)


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients where the input was positive."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output: Tensor) -> Tensor:
        return output.clamp(min=0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (output,) = ctx.saved_tensors
        return grad.clamp(min=0) * (output > 0)


def _guide(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    # Applied to the ReLU's output (equal to its input after an in-place ReLU): the mask
    # output > 0 equals input > 0, and the ReLU's own backward after it changes nothing.
    return _GuidedReLU.apply(output)


@dataclass
class _Plan:
    """How VOICE obtains one map per class for the wrapped explanation technique."""

    layer: nn.Module | None
    to_maps: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], Tensor] | None
    guided: bool = False
    smooth: bool = False
    # CAM techniques: the channel weights of the CAM; maps are built per call
    # (reshape_transform)
    weighting: Callable[[Tensor, Tensor], Tensor] | None = None
    # the per-class scores (N, C) whose gradients make the explanation of P: the logits,
    # or Finer-CAM's contrast with P's look-alikes; the contrasts are always cross-entropies
    explanation_score: Callable[[Tensor], Tensor] | None = None

    def maps(
        self, reshape_transform: Callable | None, input_shape: tuple[int, ...] | None = None
    ) -> Callable:
        if self.weighting is None:
            return self.to_maps
        cam = make_cam_reducer(self.weighting, True, reshape_transform, input_shape=input_shape)

        def first_map(grads: tuple[Tensor, ...], acts: tuple[Tensor, ...]) -> Tensor:
            return cam(grads, acts)[0]

        first_map.cam = cam  # its `saw_gradient` tells whether any gradient reached the layer
        return first_map


def _plan_for(method: Any) -> _Plan:
    """The plan for ``method`` as it is now (its layer, weighting, ...); cheap: VOICE derives
    it again at each call, so that it follows a changed or replaced ``method``."""
    if isinstance(method, ClassActivationMapBase):
        if isinstance(method, CounterfactualCAM):
            raise TypeError(
                "`method` is a CounterfactualCAM: VOICE explains 'Why P?' maps, and "
                "CounterfactualCAM's are 'What if not P?' maps."
            )
        weighting = method._channel_weights
        layer = method.layer
        if isinstance(method, FinerCAM):
            # the explanation is Finer-CAM's map of P; "Why P, rather than Q?" stays Grad-CAM
            # of the cross-entropy with label Q, the technique Finer-CAM is built on
            return _Plan(layer, None, weighting=weighting, explanation_score=method._score)
    elif isinstance(method, LayerGradCam):
        weighting, layer = gradcam_weights, method.layer
    elif isinstance(method, GuidedBackprop):
        return _Plan(None, _gradient_maps(absolute=False), guided=True)
    elif isinstance(method, Saliency):
        return _Plan(None, _gradient_maps(absolute=True))
    elif isinstance(method, NoiseTunnel) and isinstance(method.attribution_method, Saliency):
        return _Plan(None, _gradient_maps(absolute=True), smooth=True)
    else:
        raise TypeError(
            "`method` must be Grad-CAM (captum LayerGradCam or captum_ext GradCAM / "
            "ContrastCAM / FinerCAM), LayerGradCamPlusPlus, GuidedBackprop, Saliency or "
            f"NoiseTunnel(Saliency); got {type(method).__name__}."
        )
    return _Plan(layer, None, weighting=weighting)


def _is_integer_scalar(value: Any) -> bool:
    """A numpy integer scalar or a 0-dim integer tensor (read as an int)."""
    if type(value).__module__ == "numpy":
        return (
            getattr(value, "ndim", None) == 0
            and getattr(value, "dtype", None) is not None
            and (value.dtype.kind in "iu")
        )
    return (
        isinstance(value, Tensor)
        and value.dim() == 0
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


def _forward_func_of(method: Any) -> Callable:
    """The model ``method`` explains now: NoiseTunnel runs its attribution method's."""
    if isinstance(method, NoiseTunnel):
        return method.attribution_method.forward_func
    return method.forward_func


def _gradient_map(absolute: bool, grads: tuple[Tensor, ...], acts: tuple[Tensor, ...]) -> Tensor:
    return grads[0].abs() if absolute else grads[0]


def _gradient_maps(absolute: bool) -> Callable:
    # a partial of a module-level function, not a closure: a VOICE (or its plan) pickles
    return functools.partial(_gradient_map, absolute)


class _Accumulator:
    """Receives the engine's chunks in column order; keeps P, Q2 and running moments.

    Columns: 0 = explanation of P (logit), 1 = contrast Q2, 2.. = the contrast set, whose
    maps enter the variance where ``weights`` is 1 (Q != P).

    With ``moments`` (CAM maps, reference post-processing, a factory of
    :class:`~captum_ext.attr._voice_moments.UpsampledMoments` for a low-resolution size or
    None) the contrast maps are never upsampled: their normalised low-resolution maps enter
    banded second moments from which :meth:`sums` forms the full-size sums once.
    """

    def __init__(
        self,
        to_maps: Callable,
        finish: Callable,
        weights: Tensor | None,
        samples: int,
        moments: Callable[[tuple[int, ...], torch.dtype, torch.device], Any] | None = None,
    ):
        self.to_maps = to_maps
        self.finish = finish
        self.weights = weights
        self.samples = samples
        self.moments_factory = moments
        self.moments = None
        self.column = 0
        self.explanation = self.contrast = self.total = self.total_sq = None
        #: gradient techniques: (N,) whether any map of the example (any class) had a
        #: non-zero entry before post-processing; None until set to track it
        self.saw_gradient: Tensor | None = None
        self.track_gradient = False

    def __call__(self, grads, acts):
        maps = self._maps(grads, acts)
        width = maps.shape[1]
        start = self.column
        self.column += width
        if start == 0:
            self.explanation = self.finish(maps[:, :1])[:, 0]
        if start <= 1 < start + width:
            self.contrast = self.finish(maps[:, 1 - start : 2 - start])[:, 0]
        first = max(2 - start, 0)
        if first < width:
            block = maps[:, first:]
            weight = self.weights[:, start + first - 2 : start + width - 2]
            if self.moments is None and self.moments_factory is not None:
                low = tuple(block.shape[2:])
                self.moments = self.moments_factory(low, block.dtype, block.device)
                self.moments_factory = None
            if self.moments is not None:
                self.moments.add(torch.relu(block), weight)
                return None
            block = self.finish(block)
            weight = weight.to(block.dtype)
            weight = weight.reshape(*weight.shape, *([1] * (block.dim() - 2)))
            partial, partial_sq = (weight * block).sum(1), (weight * block.square()).sum(1)
            if self.total is None:
                self.total, self.total_sq = partial, partial_sq
            else:
                self.total, self.total_sq = self.total + partial, self.total_sq + partial_sq
        return None

    def sums(self) -> tuple[Tensor | None, Tensor | None]:
        """Weighted sum and sum of squares of the post-processed contrast maps."""
        if self.moments is not None:
            return self.moments.sums()  # float64: the variance and min-max cancel less
        return self.total, self.total_sq

    def _maps(self, grads, acts):
        maps = self.to_maps(grads, acts)
        if self.samples > 1:  # SmoothGrad: average the noisy copies of each example
            maps = maps.unflatten(0, (-1, self.samples)).mean(1)
        if self.track_gradient:  # read once, after the last chunk: no sync per chunk
            seen = maps.flatten(1).ne(0).any(1)
            self.saw_gradient = seen if self.saw_gradient is None else self.saw_gradient | seen
        return maps


class VOICE:
    r"""VOICE: Variance Of Induced Contrastive Explanations, the uncertainty of an explanation.

    An explanation of "Why P?" keeps some features; its uncertainty lies in the features the
    alternative explanations "Why P, rather than Q?" point to. With E the explanation
    technique and E_Q its contrastive form (the same technique on the cross-entropy with
    label Q, see :class:`~captum_ext.attr.ContrastCAM`):

    .. code-block:: text

        explanation  = E(x) for the predicted class P
        contrast     = E_Q2(x), Q2 the runner-up class
        uncertainty  = minmax( Var_{Q in contrasts, Q != P} E_Q(x) )   (population variance)
        iou          = IoU(explanation > 0.1, uncertainty > 0.1)       (after min-max)
        snr          = mean(uncertainty) / std(uncertainty)

    A high IoU means the explanation is uncertain about the very features it attributes:
    the prediction deserves less trust.

    All maps of a batch (P, Q2 and every contrast) come from ONE forward pass and the shared
    batched backward, chunked by ``max_batch``; the classes P, Q2 and the contrasts are read
    off the logits of that same forward (SmoothGrad adds one forward of the clean inputs,
    whose prediction it explains). The variance is accumulated chunk by chunk, so the maps
    held stay at a few per example, even for 1000 classes; the backward pass of a chunk
    works in memory of about half the model's activations per class (lower ``max_batch``
    if it runs out). Vision transformers: pass
    ``reshape_transform`` to :meth:`attribute`, as to the CAM classes.

    ``postprocess="reference"`` (default) reproduces the published order: each map is
    ReLU-ed, bilinearly upsampled to the input size (CAMs) and min-max normalised before the
    variance, and the variance is min-max normalised; normalising each map first makes the
    variance measure disagreement in *where* the contrasts point, not in their strength,
    which is what the paper's read-outs assume. For CAM maps the contrasts are never
    upsampled: bilinear upsampling is linear, keeps constants and mixes at most 2 x 2
    neighbouring cells, so the per-map min / max (on a sub-grid of at most 2h x 2w output
    pixels that holds them), the normalised maps and the per-pixel variance follow exactly
    from low-resolution first and banded second moments (see ``_voice_moments``); only the
    explanation, the contrast and the variance are built at the input size, at about the
    cost of the all-class :class:`~captum_ext.attr.ContrastCAM` call.
    ``postprocess="raw"`` skips the per-map normalisation and the upsampling (CAM maps stay
    at layer resolution).

    For gradient techniques (GuidedBackprop, Saliency, SmoothGrad) the maps keep the input's
    channels; the read-outs use their mean over channels. With 2 classes there is one
    contrast only: the variance is 0, the uncertainty all zeros, and the IoU ~0 (a warning
    says so, as for one explicit contrast class). An example whose input gradients are
    exactly zero for every class (a model that rounds its input, or runs its backbone under
    ``torch.no_grad()`` inside ``forward``) gets all-zero maps and a warning naming it: its
    IoU then reads 1.0 (two empty masks) and says nothing about trust. A model
    with a single output has no contrast at all and is refused (ValueError).

    Paper: Prabhushankar & AlRegib, "VOICE: Variance of Induced Contrastive Explanations to
    Quantify Uncertainty in Neural Network Interpretability", IEEE JSTSP 2024.

    Args:
        method: the explanation technique: captum ``LayerGradCam`` or our ``GradCAM`` /
            ``ContrastCAM`` (Grad-CAM), ``LayerGradCamPlusPlus`` or
            ``ContrastCAM(weighting="gradcam++")`` (Grad-CAM++), ``GuidedBackprop``,
            ``Saliency``, or ``NoiseTunnel(Saliency(model))`` (SmoothGrad), or
            :class:`~captum_ext.attr.FinerCAM`: its map of P is the explanation (P against
            its look-alikes) and the contrasts are Grad-CAM's "Why P, rather than Q?", so
            the uncertainty is Grad-CAM's and only the explanation and the IoU change.
            Read at each :meth:`attribute` call, as NoiseTunnel reads its method: a
            replaced ``voice.method`` or a changed ``layer`` / ``output_transform`` of it
            is what VOICE explains.
        postprocess (str, optional): ``"reference"`` or ``"raw"``. Default: "reference".
        output_transform (Callable, optional): reduces the model's output to (N, C) logits,
            as on the CAM classes (e.g. ``lambda out: out.logits``). Default: None, the
            ``output_transform`` of ``method`` if it has one (giving a different one to
            both is an error).

    Examples::

        >>> from captum_ext.attr import VOICE, GradCAM
        >>> voice = VOICE(GradCAM(model, "features.7"))
        >>> result = voice.attribute(images)          # all contrasts, one pass
        >>> result.uncertainty.shape, result.iou.shape
        (torch.Size([40, 1, 28, 28]), torch.Size([40]))
    """

    def __init__(
        self,
        method: Any,
        postprocess: str = "reference",
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if postprocess not in POSTPROCESS:
            if isinstance(method, nn.Module) and not hasattr(method, "attribute"):
                # VOICE(model, "layer"), as the CAMs are called: the layer went to postprocess
                raise TypeError(
                    f"VOICE wraps an attribution method, not a model: VOICE(GradCAM(model, "
                    f"{postprocess!r})) for Grad-CAM at that layer (or another CAM, Saliency, "
                    f"...). The second argument is `postprocess`, one of {POSTPROCESS}."
                )
            raise ValueError(f"`postprocess`={postprocess!r}: expected one of {POSTPROCESS}.")
        _check_output_transform(output_transform)
        # refused here already; `attribute` derives the plan again from `self.method` as it
        # is then (a replaced method, a CAM's changed layer), as NoiseTunnel reads its method
        _plan_for(method)
        _merged_output_transform(output_transform, method)
        self.method = method
        self.postprocess = postprocess
        self._own_output_transform = output_transform

    _fast_postprocess = True  # private: False materialises every upsampled map (tests)

    @property
    def plan(self) -> _Plan:
        """How VOICE obtains its maps from ``method`` as it is now (its layer, weighting)."""
        return _plan_for(self.method)

    @property
    def forward_func(self) -> Callable:
        """The model explained: the ``forward_func`` of ``method`` as it is now."""
        return _forward_func_of(self.method)

    @forward_func.setter
    def forward_func(self, value: Any) -> None:
        raise AttributeError(
            "VOICE explains the model of its `method`: replace `method` (e.g. "
            "voice.method = GradCAM(model, layer)) instead of setting `forward_func`."
        )

    @property
    def output_transform(self) -> Callable[[Any], Tensor] | None:
        """The ``output_transform`` given to VOICE, else that of ``method`` as it is now."""
        own = self._own_output_transform
        return own if own is not None else getattr(self.method, "output_transform", None)

    @output_transform.setter
    def output_transform(self, value: Callable[[Any], Tensor] | None) -> None:
        _check_output_transform(value)
        self._own_output_transform = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a VOICE pickled when it kept copies of the method's plan, model and transform
        state = dict(state)
        state.pop("plan", None)
        state.pop("forward_func", None)
        if "output_transform" in state:
            merged = state.pop("output_transform")
            own = getattr(state.get("method"), "output_transform", None)
            state.setdefault("_own_output_transform", None if merged is own else merged)
        self.__dict__.update(state)

    def _current(self) -> tuple[_Plan, Callable, Callable[[Any], Tensor] | None]:
        """The plan, model and output transform of ``method`` as it is now, checked."""
        method = self.method
        plan = _plan_for(method)
        return (
            plan,
            _forward_func_of(method),
            _merged_output_transform(self._own_output_transform, method),
        )

    def has_convergence_delta(self) -> bool:
        """Refuses, clearly, what Captum's wrappers ask first: ``NoiseTunnel(VOICE(...))``
        failed with "'VOICE' object has no attribute 'has_convergence_delta'"."""
        raise TypeError(
            "VOICE is not a Captum attribution method: its result is a VOICEResult (maps and "
            "read-outs), which NoiseTunnel cannot average. For SmoothGrad explanations give "
            "VOICE NoiseTunnel(Saliency(model)) with its own `nt_samples` and `stdevs`."
        )

    @log_usage()
    @leaves_inference_mode
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        contrasts: Any = "all",
        additional_forward_args: Any = None,
        max_batch: int | None = None,
        threshold: float = 0.1,
        nt_samples: int = 8,
        stdevs: float = 0.1,
        generator: torch.Generator | int | None = None,
        reshape_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> VOICEResult:
        r"""Explanation, runner-up contrast and uncertainty of each example's prediction.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            target (int, list or Tensor, optional): the class P to explain, one per example
                in any form Captum accepts. Default: None, the predicted class.
            contrasts (str, int, list or Tensor, optional): the contrast classes Q: ``"all"``
                (every class but P, as in the paper), an int k >= 2 (the k most likely
                classes other than P), or classes given as a list / 1-D tensor (for every
                example) or a 2-D tensor (one row per example), each class at most once
                in a row; P is left out of the variance wherever it appears.
                None: the default, ``"all"``.
                Default: "all".
            additional_forward_args (Any, optional): extra arguments of the model.
                With NoiseTunnel(Saliency), tensors whose first dimension is N, also
                nested in tuples, lists, mappings and dataclasses, are repeated with the
                noisy copies (a shared table with N rows too: bind it in a closure);
                everything else unchanged.
            max_batch (int, optional): classes per batched backward. Default: 64, fewer
                where one chunk would need more than about 1 GiB (its gradients and the
                backward pass's working memory, estimated from the sizes of the module
                outputs it goes through).
            threshold (float, optional): threshold of the IoU read-out, in [0, 1) (the maps are
                min-max normalised first).
                Default: 0.1.
            nt_samples (int, optional): noisy copies per example (SmoothGrad only), a
                positive int. Default: 8.
            stdevs (float, optional): standard deviation of the noise (SmoothGrad only), in
                input units as Captum's NoiseTunnel, a finite number >= 0. Default: 0.1.
            generator (torch.Generator or int, optional): random source of the noise (SmoothGrad
                only): one seed is drawn from it per call (from torch's global generator
                when None, as Captum's NoiseTunnel draws its noise), and each example's
                noisy copies come from that seed and the example's own values, so an
                example gets the same copies alone, anywhere in a batch and in any order.
                ``nt_samples``, ``stdevs`` and ``generator`` have no effect on the other
                methods, but are checked with every method (an invalid value raises the
                same error as with SmoothGrad), so that it is never silently ignored.
            reshape_transform (Callable, optional): CAM techniques only: turns the layer's
                activations (and gradients) into (N, K, h, w) maps, e.g. the tokens
                (N, 1 + h*w, K) of a vision transformer (drop the class token, reshape,
                move K first), as in the CAM classes and pytorch-grad-cam. A tokens-first
                layer (T, N, K), such as ``nn.TransformerEncoderLayer`` with
                ``batch_first=False``, works with a transform that moves the examples first
                (e.g. ``lambda t: fold(t.transpose(0, 1))``). Default: None.

        Returns:
            VOICEResult: see its attributes.
        """
        plan, forward_func, output_transform = self._current()
        formatted = format_inputs(inputs)
        threshold = _check_threshold(threshold)
        # checked for every method, not only SmoothGrad's: an invalid value is never ignored
        samples = self._check_samples(nt_samples, stdevs)
        generator = as_generator(generator)
        if plan.weighting is None and len(formatted) > 1:
            raise ValueError(
                f"VOICE({type(self.method).__name__}) maps one input tensor, and `inputs` holds "
                f"{len(formatted)}: pass the image as `inputs` and the model's other inputs "
                "as `additional_forward_args` (their maps would be silently left out)."
            )
        if formatted[0].dim() < 3 and (plan.layer is None or self.postprocess == "reference"):
            # (a CAM's maps are the layer's: with postprocess="raw" they stay there)
            raise ValueError(_no_spatial_inputs_message(self.method, formatted[0], plan))
        if reshape_transform is not None:
            if not callable(reshape_transform):
                raise TypeError("`reshape_transform` must be callable (tokens -> N x K x h x w).")
            if plan.weighting is None:
                raise ValueError(
                    "`reshape_transform` applies to CAM techniques (layer activations); "
                    f"VOICE({type(self.method).__name__}) explains the inputs."
                )
        model = root_module(forward_func)
        warn_random_in_train_mode(f"VOICE({type(self.method).__name__})", model)
        classes: dict[str, Tensor] = {}
        accumulate = _Accumulator(
            plan.maps(reshape_transform, tuple(formatted[0].shape)),
            self._finish(formatted[0], plan),
            None,
            1,
            self._moments(formatted[0], plan),
        )
        # input-gradient maps: examples whose maps are all exactly zero are warned of
        # (the CAMs' reducer tracks the gradients at their layer itself)
        accumulate.track_gradient = plan.weighting is None

        def select(logits: Tensor) -> Tensor:
            """The columns to differentiate, from the logits of the engine's own forward."""
            classes.update(self._classes(logits, target, contrasts))
            accumulate.weights = classes["weights"]
            return classes["columns"]

        engine_inputs, engine_args = formatted, additional_forward_args
        if plan.smooth:
            # the classes come from the clean inputs; the engine sees the noisy copies
            with preserved_state([model], hidden_model=model is None), torch.no_grad():
                clean = run_forward(
                    forward_func, formatted, additional_forward_args, output_transform
                )
            columns = select(clean).repeat_interleave(samples, dim=0)
            engine_inputs, engine_args = _noisy_copies(
                formatted, additional_forward_args, samples, stdevs, generator
            )
            accumulate.samples = samples
            columns_of = lambda _logits: columns  # noqa: E731
        else:
            columns_of = select  # one forward: the engine's
        guided = self._guided_hooks(model) if plan.guided else ()
        with registered_hooks(*guided):
            computed = class_gradients(
                forward_func,
                engine_inputs,
                columns_of,
                layer=plan.layer,
                score=_explanation_then_cross_entropy(plan.explanation_score),
                additional_forward_args=engine_args,
                output_transform=output_transform,
                max_batch=max_batch,
                reduce=accumulate,
                reshape_transform=reshape_transform,
            )
        cam = getattr(accumulate.to_maps, "cam", None)
        if cam is not None and not cam.saw_gradient:
            warnings.warn(
                zero_gradient_warning(
                    f"VOICE({type(self.method).__name__})",
                    "the layer's",
                    root_module(forward_func),
                ),
                stacklevel=user_stacklevel(),
            )
        if accumulate.saw_gradient is not None:
            blank = (~accumulate.saw_gradient).nonzero().flatten().tolist()
            if blank:
                warnings.warn(
                    _zero_input_gradient_warning(
                        f"VOICE({type(self.method).__name__})",
                        blank,
                        len(accumulate.saw_gradient),
                        root_module(forward_func),
                    ),
                    stacklevel=user_stacklevel(),
                )
        logits = clean if plan.smooth else computed.logits
        explained, runner_up, weights = (
            classes["explained"],
            classes["runner_up"],
            classes["weights"],
        )
        check_explained = getattr(self.method, "_check_explained", None)
        if check_explained is not None:  # e.g. Finer-CAM's maps that vanish
            check_explained(logits, explained.reshape(-1, 1))
        prediction = logits.argmax(dim=1)
        total, total_sq = accumulate.sums()
        count = weights.sum(1).to(accumulate.explanation.dtype if total is None else total.dtype)
        uncertainty = _variance(total, total_sq, count)
        cam = plan.layer is not None
        uncertainty = minmax_normalize(_with_channel_dim(uncertainty, cam), start_dim=1)
        uncertainty = uncertainty.to(accumulate.explanation.dtype)
        explanation = _with_channel_dim(accumulate.explanation, cam)
        contrast = _with_channel_dim(accumulate.contrast, cam)
        if self.postprocess == "raw":
            explanation = minmax_normalize(explanation, start_dim=1)
            contrast = minmax_normalize(contrast, start_dim=1)
        from ..metrics.explanation import voice_iou, voice_snr

        flat_explanation = explanation.mean(1, keepdim=True)  # (N, 1, *spatial)
        flat_uncertainty = uncertainty.mean(1, keepdim=True)
        # rows whose maps are NaN (a model that overflowed, named by a warning) read NaN
        broken = torch.isnan(flat_explanation.flatten(1)).any(1) | torch.isnan(
            flat_uncertainty.flatten(1)
        ).any(1)
        iou = torch.full(
            (logits.shape[0],), float("nan"), dtype=flat_uncertainty.dtype, device=logits.device
        )
        snr = iou.clone()
        kept = ~broken
        if bool(kept.any()):
            iou[kept] = voice_iou(
                flat_explanation[kept], flat_uncertainty[kept], threshold=threshold
            ).to(iou)
            snr[kept] = voice_snr(flat_uncertainty[kept]).to(snr)
        return VOICEResult(
            explanation=explanation,
            contrast=contrast,
            uncertainty=uncertainty,
            iou=iou,
            snr=snr,
            # float64: confident predictions would round to exactly 0 in float32
            log_likelihood=_log_likelihood(logits, explained),
            prediction=prediction,
            target=explained,
            contrast_class=runner_up,
            n_contrasts=weights.sum(1),
        )

    def _classes(self, logits: Tensor, target: Any, contrasts: Any) -> dict[str, Tensor]:
        """P, Q2, the contrast set, its weights (Q != P) and the engine's columns."""
        n, num_classes = logits.shape
        if num_classes < 2:
            raise ValueError(
                f"VOICE needs a model with at least 2 classes: the uncertainty is the "
                f"variance over the classes other than P, but the model has only "
                f"{num_classes} output (pass `output_transform` if the output holds more)."
                + single_logit_hint()
            )
        explained, _ = class_selection(target, logits, argument="target", default="predicted")
        if explained.shape[1] != 1:
            raise ValueError("`target` must give one class per example for VOICE.")
        explained = explained[:, 0]
        # classes by decreasing logit, the explained class P moved to the front
        order = logits.argsort(dim=1, descending=True, stable=True)  # ties: lowest index
        others = order[order != explained[:, None]].view(n, num_classes - 1)
        order = torch.cat([explained[:, None], others], dim=1)
        runner_up = order[:, 1]
        contrast_set = self._contrast_set(contrasts, order, n, num_classes)
        weights = contrast_set != explained[:, None]
        if bool((weights.sum(1) < 2).all()):
            warnings.warn(
                "VOICE: every example has fewer than 2 contrast classes "
                + (
                    "(a two-class model has one: the class other than P)"
                    if num_classes == 2
                    else "(`contrasts` gives at most one class other than P)"
                )
                + ", and the variance of one map is 0: the uncertainty maps are all zeros and "
                "the IoU is ~0, whatever the input. "
                + (
                    "VOICE needs a model with 3 or more classes."
                    if num_classes == 2
                    else "Give `contrasts` at least two classes other than the explained one."
                ),
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        columns = torch.cat(
            [explained[:, None], num_classes + runner_up[:, None], num_classes + contrast_set],
            dim=1,
        )
        return {
            "explained": explained,
            "runner_up": runner_up,
            "weights": weights,
            "columns": columns,
        }

    def _finish(self, reference_input: Tensor, plan: _Plan) -> Callable[[Tensor], Tensor]:
        """Per-map post-processing of every (N, B, ...) chunk of maps, in the paper's order."""
        spatial = tuple(reference_input.shape[2:])
        upsample = plan.layer is not None and self.postprocess == "reference"

        def finish(maps: Tensor) -> Tensor:
            maps = torch.relu(maps)
            if self.postprocess == "raw":
                return maps
            if upsample and tuple(maps.shape[2:]) != spatial:
                maps = upsample_maps(maps, spatial)
            return minmax_normalize(maps)  # per map: over (H, W), or (C, H, W)

        return finish

    def _moments(self, reference_input: Tensor, plan: _Plan) -> Callable | None:
        """Factory of the low-resolution route of the reference post-processing, or None.

        CAM maps that are upsampled (2-D, bilinear) take the route of
        :mod:`~captum_ext.attr._voice_moments`: the same numbers without materialising one
        full-size map per contrast. ``_fast_postprocess = False`` keeps the materialising path.
        """
        spatial = tuple(reference_input.shape[2:])
        if (
            not self._fast_postprocess
            or plan.layer is None
            or self.postprocess != "reference"
            or len(spatial) != 2
        ):
            return None

        def make(low: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Any:
            if low == spatial or not UpsampledMoments.applies(low, spatial, dtype, device):
                return None
            return UpsampledMoments(low, spatial, dtype, device)

        return make

    @staticmethod
    def _contrast_set(contrasts: Any, order: Tensor, n: int, num_classes: int) -> Tensor:
        device = order.device
        if contrasts is None:  # None: the default, every class but P
            contrasts = "all"
        if isinstance(contrasts, str):
            if contrasts != "all":
                raise ValueError(f"`contrasts`={contrasts!r}: expected 'all', an int or classes.")
            return torch.arange(num_classes, device=device).expand(n, num_classes)
        if isinstance(contrasts, bool):
            raise TypeError("`contrasts` must be 'all', an int k or class indices, not a bool.")
        if _is_integer_scalar(contrasts):  # numpy ints and 0-dim tensors are top-k too
            contrasts = int(contrasts)
        if isinstance(contrasts, int):
            if not 2 <= contrasts <= num_classes - 1:
                raise ValueError(
                    f"`contrasts`={contrasts}: top-k needs 2 <= k <= {num_classes - 1} for a "
                    f"model with {num_classes} classes (the variance of one contrast is 0)."
                )
            return order[:, 1 : contrasts + 1]
        values = torch.as_tensor(contrasts, device=device)
        if values.is_floating_point() or values.dim() not in (1, 2) or values.numel() == 0:
            raise TypeError("`contrasts` classes must be a non-empty 1-D or 2-D integer list.")
        values = values.long()
        if int(values.min()) < 0 or int(values.max()) >= num_classes:
            raise ValueError(f"`contrasts` holds classes outside [0, {num_classes}).")
        if values.dim() == 1:
            chosen = values.expand(n, len(values))
        elif values.shape[0] not in (1, n):
            raise ValueError(
                f"`contrasts` has {values.shape[0]} rows for {n} examples; give 1 or {n}."
            )
        else:
            chosen = values.expand(n, values.shape[1])
        # a set: each class other than P counts once (P, left out, may pad a row)
        rows = chosen.masked_fill(chosen == order[:, :1], -1).sort(dim=1).values
        if bool(((rows[:, 1:] == rows[:, :-1]) & (rows[:, 1:] >= 0)).any()):
            raise ValueError(
                "`contrasts` names a class other than P more than once in a row; the "
                "uncertainty is the variance over a set of contrast classes, where each "
                "counts once."
            )
        return chosen

    @staticmethod
    def _check_samples(nt_samples: Any, stdevs: Any) -> int:
        check_number(stdevs, "stdevs", allow_minimum=True)
        return check_int(nt_samples, "nt_samples")

    @staticmethod
    def _guided_hooks(model: nn.Module | None) -> list:
        if model is None:
            raise TypeError("GuidedBackprop needs forward_func to be an nn.Module.")
        _warn_unguided_activations(model)
        return [call_hook(m, _guide) for m in model.modules() if isinstance(m, nn.ReLU)]


#: models already warned that guided VOICE leaves their non-ReLU activations unguided
_MODELS_WARNED_UNGUIDED: weakref.WeakSet = weakref.WeakSet()


def _warn_unguided_activations(model: nn.Module) -> None:
    """Warn that VOICE(GuidedBackprop) guides the backward pass through the ``nn.ReLU``
    modules only (as Captum's GuidedBackprop does) when the model has other hidden
    activations (GELU, SiLU, Hardswish, ...; :func:`hidden_activation_counts`): the gradient
    passes them unguided, so where they carry the network the maps are the plain input
    gradient, and exactly that on a model without any ``nn.ReLU``."""
    if model in _MODELS_WARNED_UNGUIDED:  # once per model (the package's catch_warnings
        return  # blocks reset Python's once-per-line record)
    others = hidden_activation_counts(model)
    if not others:
        return
    _MODELS_WARNED_UNGUIDED.add(model)
    relus = sum(isinstance(m, nn.ReLU) for m in user_model(model).modules())
    listed = ", ".join(f"{n} {name}" for name, n in sorted(others.items()))
    effect = (
        "so the maps are exactly the plain input gradient (Saliency's, without its absolute value)"
        if relus == 0
        else "so the maps are partly the plain input gradient (Saliency's, without its absolute "
        "value): guided only where the network runs through its ReLUs"
    )
    warnings.warn(
        f"VOICE(GuidedBackprop): guided backpropagation guides the gradient through the "
        f"nn.ReLU modules only (as Captum's GuidedBackprop does), and {type(model).__name__} "
        f"has {relus} of them; its other activations ({listed}) pass the gradient unguided, "
        f"{effect}. VOICE(Saliency) or a Grad-CAM explain such a model as they are.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _no_spatial_inputs_message(method: Any, inputs: Tensor, plan: _Plan) -> str:
    """The refusal of ``inputs`` without a spatial dimension (tabular (N, F) features),
    given before the model runs. A CAM's maps are at its layer, so for a CAM it says how to
    keep them there (its reference post-processing upsamples them to the inputs' size)."""
    message = (
        f"VOICE({type(method).__name__}) needs `inputs` with at least one spatial dimension, "
        "(N, C, *spatial): an image (N, C, H, W), a signal (N, C, L), a volume "
        f"(N, C, T, H, W); got shape {tuple(inputs.shape)}. Its read-outs (IoU, SNR) compare "
        "maps over space, and tabular (N, F) features have none."
    )
    if plan.layer is not None:
        message += (
            " The reference post-processing upsamples the CAM's maps to the inputs' size; "
            "with a layer whose output is spatial, VOICE(..., postprocess='raw') keeps them at "
            "the layer's size."
        )
    return message


def _log_likelihood(logits: Tensor, explained: Tensor) -> Tensor:
    """(N,) log softmax of ``logits`` at the ``explained`` classes, in float64 (on the CPU for
    a device without float64), the top class's entry as ``-log1p(S)``: confident predictions
    would round to exactly 0 (in float32 from a logit gap of about 17, in float64 of 37)."""
    log_probs = log_softmax_precise(float64_here_or_cpu(logits), 1)
    return log_probs.gather(1, explained.to(log_probs.device).view(-1, 1))[:, 0]


def _zero_input_gradient_warning(
    method: str, blank: list[int], n: int, model: nn.Module | None
) -> str:
    """The warning for examples whose input gradients are exactly zero for every class:
    their explanation, contrast and uncertainty maps are all zero, and the IoU of two empty
    masks reads 1 (``voice_iou``'s smoothing), which there says nothing about trust. A
    quantized ``model`` is named as the cause, and a half-precision one as the likelier one,
    as in :func:`~captum_ext.attr._cam.zero_gradient_warning`."""
    if len(blank) == n:
        which = "for every input"
    else:
        shown = ", ".join(str(i) for i in blank[:8]) + (", ..." if len(blank) > 8 else "")
        which = f"for {len(blank)} of the {n} examples (rows {shown})"
    half = _half_precision_note(model)
    cause = quantized_note(model) or (
        half
        + ("Otherwise the model's" if half else "The model's")
        + " output does not depend on its input through autograd: its forward rounds or "
        "quantises the input (torch.round), runs under torch.no_grad() (a linear probe on a "
        "frozen backbone inside `forward`) or detaches it. Lift the no_grad / detach while "
        "explaining, or explain a layer after that point with a CAM technique "
        "(VOICE(GradCAM(model, layer)))."
    )
    return (
        f"{method}: the input gradients of every class are exactly zero {which}, so the "
        "explanation, contrast and uncertainty maps there are all zero. Their IoU reads 1.0 "
        "only because both masks are empty (voice_iou's smoothing gives two empty masks 1) "
        f"and their SNR 0: neither says anything about the explanation's trust. {cause}"
    )


def _check_output_transform(output_transform: Any) -> None:
    if output_transform is not None and not callable(output_transform):
        raise TypeError(
            "`output_transform` must be callable (model output -> (N, classes) logits), "
            f"got {type(output_transform).__name__}."
        )


def _merged_output_transform(
    output_transform: Callable[[Any], Tensor] | None, method: Any
) -> Callable[[Any], Tensor] | None:
    """VOICE's own ``output_transform``, else that of ``method``; both, different: refused."""
    own = getattr(method, "output_transform", None)
    if output_transform is not None and own is not None and own is not output_transform:
        raise ValueError(
            f"`output_transform` was given to both VOICE and {type(method).__name__}, "
            "with different functions; give it once."
        )
    return output_transform if output_transform is not None else own


def _check_threshold(threshold: Any) -> float:
    # the maps are min-max normalised to [0, 1]: outside [0, 1) every mask is full or empty
    return check_number(
        threshold, "threshold", allow_minimum=True, maximum=1.0, allow_maximum=False
    )


def _explanation_then_cross_entropy(
    explanation_score: Callable[[Tensor], Tensor] | None,
) -> Callable[[Tensor], Tensor]:
    """The engine's score: the logits, or ``explanation_score(logits)`` (Finer-CAM), for
    columns 0..C-1, then the cross-entropies of :func:`_logit_then_cross_entropy`."""
    if explanation_score is None:
        return _logit_then_cross_entropy

    def score(logits: Tensor) -> Tensor:
        contrasts = _logit_then_cross_entropy(logits)[:, logits.shape[1] :]
        return torch.cat([explanation_score(logits), contrasts], dim=1)

    return score


def _logit_then_cross_entropy(logits: Tensor) -> Tensor:
    """Columns 0..C-1: the logits (Why P?); C..2C-1: the cross-entropy with label Q (Why not Q?),
    as a function with the same gradient at these logits.

    Only gradients are read: d(-log softmax(z)_Q)/dz = softmax(z) - e_Q, which is also the
    gradient of the linear ``softmax(z).detach() . z - z_Q``. Under ``is_grads_batched`` the
    log-softmax backward runs once per class row (a vmap fallback: ~1000 small calls, 10% of
    VOICE on resnet18 at batch 1); the linear form's backward (sum, mul, sub) batches.

    Written as ``sum_{j != Q} p_j z_j - (1 - p_Q) z_Q`` (the same gradient), so that the
    entry ``p_Q - 1`` is ``-(1 - p_Q)`` from
    :func:`~captum_ext._utils.batched_grad.softmax_complement`: with Q the confident class
    (a target other than the prediction) ``p_Q - 1`` rounds to 0 in float32 and the map
    lost its largest term. ``t.sum() - t`` with ``t = p * z`` passes exactly 0 to ``z_Q``.
    """
    detached = logits.detach()
    precise = detached if detached.dtype == torch.float64 else detached.float()
    p = torch.softmax(precise, dim=1).to(logits.dtype)  # half logits: softmax in float32
    rest = softmax_complement(precise, dim=1).to(logits.dtype)
    weighted = p * logits
    contrasts = (weighted.sum(1, keepdim=True) - weighted) - rest * logits
    return torch.cat([logits, contrasts], dim=1)


def _variance(total: Tensor | None, total_sq: Tensor | None, count: Tensor) -> Tensor:
    """Population variance from running sums; zero where fewer than 2 contrasts entered."""
    if total is None:
        raise ValueError("`contrasts` selected no contrast class.")
    shape = (-1,) + (1,) * (total.dim() - 1)
    safe = count.clamp(min=1).view(shape)
    mean = total / safe
    variance = (total_sq / safe - mean.square()).clamp(min=0)
    return torch.where(count.view(shape) > 1, variance, torch.zeros_like(variance))


def _with_channel_dim(maps: Tensor, cam: bool) -> Tensor:
    """CAM maps (N, *spatial) -> (N, 1, *spatial), for images (N, 1, H, W) and as well for
    signals (N, 1, L) or volumes (N, 1, T, H, W); gradient maps (N, C, *spatial) stay as
    they are."""
    return maps.unsqueeze(1) if cam else maps


def _noisy_copies(
    inputs: tuple[Tensor, ...],
    additional_forward_args: Any,
    samples: int,
    stdev: float,
    generator: torch.Generator | None,
) -> tuple[tuple[Tensor, ...], Any]:
    """SmoothGrad inputs: each example repeated ``samples`` times (repeat_interleave) + noise.

    One seed is drawn from ``generator`` (the global generator when None); each example's
    noise comes from that seed and the example's own values (:func:`content_keys`), so an
    example gets the same noisy copies alone, anywhere in a batch or in another order."""
    noisy = []
    seed = seed_from(as_generator(generator))
    for index, x in enumerate(inputs):
        repeated = x.repeat_interleave(samples, dim=0)
        if x.is_floating_point() and stdev > 0:
            keys = content_keys(x, seed + index)
            noise = example_normal(keys, samples, tuple(x.shape[1:]), x.dtype).to(x.device)
            repeated = repeated + stdev * noise
        noisy.append(repeated)
    n = inputs[0].shape[0]
    return tuple(noisy), repeat_per_example(additional_forward_args, n, samples)
