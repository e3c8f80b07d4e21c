"""Shared machinery of the class-activation-map methods (private).

For a layer with activations A (K x u x v) and a backward signal G = d s / d A of a per-class
scalar s (a logit, or the cross-entropy with a contrast class):

    Grad-CAM weights    alpha_k = mean_(u,v) G_k
    Grad-CAM++ weights  alpha_k = sum_(u,v) a_kuv * ReLU(G_kuv),
                        a_kuv = G_kuv^2 / (2 G_kuv^2 + sum_(i,j) A_kij * G_kuv^3)
    map                 ReLU( sign * sum_k alpha_k A_k )
                        (attr_dim_summation=False: ReLU( sign * alpha_k A_k ) per channel)

All classes requested for a batch come from one forward pass through the shared engine
(``captum_ext._utils.batched_grad``); the maps are formed chunk by chunk so memory stays at
the size of the maps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr import GradientAttribution, LayerAttribution
from torch import Tensor

from .._utils.batched_grad import check_grad_kwargs, class_gradients
from .._utils.layers import resolve_layer, root_module, spatial_layer_suggestions
from .._utils.maps import check_normalize, minmax_normalize, upsample_maps
from .._utils.validation import format_inputs

WEIGHTINGS = ("gradcam", "gradcam++")


def gradcam_weights(gradients: Tensor, activations: Tensor) -> Tensor:
    """(N, B, K, *S) gradients -> (N, B, K) channel weights: the spatial mean."""
    if gradients.dim() <= 3:
        return gradients
    return gradients.mean(dim=tuple(range(3, gradients.dim())))


def gradcam_plus_plus_weights(gradients: Tensor, activations: Tensor) -> Tensor:
    """Grad-CAM++ channel weights (Chattopadhay et al., WACV 2018, eq. 19 with exp scores)."""
    if gradients.dim() <= 3:
        return torch.relu(gradients)
    spatial = tuple(range(3, gradients.dim()))
    sum_activations = activations.sum(dim=tuple(range(2, activations.dim())))  # (N, K)
    sum_activations = sum_activations.reshape(*sum_activations.shape, *([1] * len(spatial)))
    squared = gradients.pow(2)
    denominator = 2 * squared + sum_activations.unsqueeze(1) * squared * gradients
    usable = (gradients != 0) & (denominator != 0)
    alpha = torch.where(usable, squared / torch.where(usable, denominator, 1), 0)
    return (alpha * torch.relu(gradients)).sum(dim=spatial)


def _apply_reshape(reshape_transform, tensor: Tensor, batch_dims: int) -> Tensor:
    if reshape_transform is None:
        return tensor
    lead = tensor.shape[:batch_dims]
    reshaped = reshape_transform(tensor.flatten(0, batch_dims - 1))
    if not isinstance(reshaped, Tensor):
        raise TypeError("`reshape_transform` must return a tensor.")
    return reshaped.unflatten(0, lead)


class NoSpatialDimensions(ValueError):
    """The CAM layer's output has no spatial dimensions (raised by the reducer)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        super().__init__(
            f"`layer` outputs activations of shape {shape} without spatial dimensions; a CAM "
            "layer must output N x K x h x w (or tokens with a `reshape_transform` to that)."
        )


def make_cam_reducer(
    weighting: str,
    sign: float,
    relu: bool,
    reshape_transform: Callable | None,
    attr_dim_summation: bool = True,
) -> Callable:
    """``reduce(gradients, activations)`` for the engine: (N, B, K, *S) gradients -> maps.

    The maps are (N, B, *S), or with ``attr_dim_summation=False`` the per-channel weighted
    activations (N, B, K, *S) (Captum's LayerGradCam convention for that flag).
    """
    weight_fn = gradcam_weights if weighting == "gradcam" else gradcam_plus_plus_weights

    def reduce(gradients: tuple[Tensor, ...], activations: tuple[Tensor, ...]):
        maps = []
        for grad, act in zip(gradients, activations):
            act = _apply_reshape(reshape_transform, act, 1)
            if act.dim() < 3:
                raise NoSpatialDimensions(tuple(act.shape))
            grad = _apply_reshape(reshape_transform, grad, 2)
            weights = weight_fn(grad, act)
            if sign != 1:
                weights = sign * weights
            if attr_dim_summation:
                cam = torch.einsum("nbk,nk...->nb...", weights, act)
            else:
                cam = torch.einsum("nbk,nk...->nbk...", weights, act)
            maps.append(torch.relu(cam) if relu else cam)
        return tuple(maps)

    return reduce


class ClassActivationMapBase(LayerAttribution, GradientAttribution):
    """Common constructor and computation of ContrastCAM, CounterfactualCAM, Grad-CAM++."""

    _score = "logit"
    _sign = 1.0
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
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting`={weighting!r}: expected one of {WEIGHTINGS}.")
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
                    close = spatial_layer_suggestions(
                        model,
                        lambda: run_forward(
                            self.forward_func,
                            inputs,
                            additional_forward_args,
                            None,
                            allow_multidim=True,
                        ),
                        self.layer,
                    )
            except Exception:  # the suggestion is a courtesy; the error below stands
                close = []
            if close:
                hint = (
                    " The closest layers with spatial output before it: "
                    + ", ".join(repr(n) for n in close)
                    + "."
                )
        shaping = " after `reshape_transform`" if reshape_transform is not None else ""
        return ValueError(
            f"{name}: `layer`={label!r} has an {where} of shape {shape}{shaping}, without "
            "spatial dimensions; a CAM layer must output N x K x h x w activations (a "
            "convolutional layer or block, or tokens with a `reshape_transform` to "
            f"N x K x h x w).{hint}"
        )

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
    ) -> Tensor | tuple[Tensor, ...]:
        check_normalize(normalize)
        name = type(self).__name__
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError("`reshape_transform` must be callable (tokens -> N x K x h x w).")
        if not isinstance(attr_dim_summation, bool):
            raise TypeError(
                f"`attr_dim_summation` must be a bool, got {type(attr_dim_summation).__name__}."
            )
        if interpolate_mode is not None and not upsample_to_input:
            raise ValueError(
                "`interpolate_mode` applies to the upsampling; pass upsample_to_input=True "
                "with it (or resize the maps with LayerAttribution.interpolate)."
            )
        grad_kwargs = check_grad_kwargs(grad_kwargs, method=name)
        formatted = format_inputs(inputs)
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
                reduce=make_cam_reducer(
                    self.weighting,
                    self._sign,
                    relu_attributions,
                    reshape_transform,
                    attr_dim_summation,
                ),
                class_argument=self._class_argument,
                default_classes=self._default_classes,
                grad_kwargs=grad_kwargs,
                allow_multidim=True,
            )
        except NoSpatialDimensions as error:
            raise self._no_spatial_error(
                error.shape,
                formatted,
                additional_forward_args,
                attribute_to_layer_input,
                reshape_transform,
            ) from None
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


def _upsample(maps: Tensor, lead: int, size: tuple[int, ...], mode: str | None) -> Tensor:
    if lead == 2 or maps.dim() <= lead:
        return upsample_maps(maps, size, mode)
    flat = upsample_maps(maps.flatten(1, lead - 1), size, mode)
    return flat.unflatten(1, maps.shape[1:lead])


class TargetClassCAMBase(ClassActivationMapBase):
    """A CAM explaining the class(es) given by Captum's ``target`` (default: the prediction).

    Subclasses fix the weighting with the class attribute ``_weighting`` and define their own
    ``attribute`` (so that Python's messages about its arguments name the public class).
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
