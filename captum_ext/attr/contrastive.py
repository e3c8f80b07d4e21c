"""Contrastive: the contrastive form of any Captum gradient attribution."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import Attribution, GradientAttribution, NoiseTunnel
from captum.log import log_usage
from torch import Tensor

from .._utils.batched_grad import run_forward
from .._utils.layers import root_module
from .._utils.model_state import preserved_state
from .._utils.validation import class_selection, format_inputs, repeat_per_example

DEFAULT_ROWS_PER_CALL = 64


class ContrastiveForward:
    r"""``x -> -log_softmax(f(x))``: column Q is the per-example cross-entropy with label Q.

    Handing this function to a Captum method with ``target=Q`` makes the method explain
    ``CE(f(x), Q)`` instead of the logit of the target class.
    """

    def __init__(self, forward_func: Callable, output_transform: Callable | None = None):
        self.forward_func = forward_func
        self.output_transform = output_transform

    def __call__(self, *args: Any) -> Tensor:
        output = self.forward_func(*args)
        if self.output_transform is not None:
            output = self.output_transform(output)
        if not isinstance(output, Tensor) or output.dim() != 2:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"forward_func must return (N, classes) logits, got {got}; pass "
                "`output_transform` to Contrastive."
            )
        return -torch.log_softmax(output, dim=1)


def _swap_forward(method: Attribution, forward: ContrastiveForward) -> Attribution:
    """A shallow copy of ``method`` (and of NoiseTunnel's inner method) using ``forward``."""
    swapped = copy.copy(method)
    if isinstance(swapped, NoiseTunnel):
        swapped.attribution_method = _swap_forward(swapped.attribution_method, forward)
    swapped.forward_func = forward
    return swapped


class Contrastive(GradientAttribution):
    r"""Make any Captum gradient attribution contrastive: "Why P, rather than Q?".

    The wrapped method explains the per-example cross-entropy with the contrast class Q as
    label, by receiving the forward function ``x -> -log_softmax(f(x))`` and ``target=Q``:

    .. code-block:: text

        explained scalar  CE(f(x), Q) = -log softmax(f(x))_Q
        its gradient      d CE / d x = J^T (softmax(f(x)) - onehot(Q))

    the signal ContrastCAM backpropagates. Sign: a positive attribution is evidence against
    Q (it raises the loss of predicting Q), i.e. evidence for the class the network prefers
    over Q. ``Contrastive(LayerGradCam, model, layer)`` with ``relu_attributions=True`` (Captum's
    default is False) equals ``ContrastCAM(model, layer)``.

    Works with Saliency, InputXGradient, IntegratedGradients, GuidedBackprop, LayerGradCam,
    our LayerGradCamPlusPlus and NoiseTunnel around any of them (a NoiseTunnel instance is
    made contrastive inside); the given instance is copied, never modified.

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

    def __init__(
        self,
        method: type | Attribution,
        forward_func: Callable | None = None,
        *args: Any,
        output_transform: Callable | None = None,
        **kwargs: Any,
    ) -> None:
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
            instance = method(forward_func, *args, **kwargs)
        else:
            raise TypeError(
                f"`method` must be a Captum Attribution class or instance, got "
                f"{type(method).__name__}."
            )
        if isinstance(instance, Contrastive):
            raise TypeError("`method` is already Contrastive.")
        self.model_forward = instance.forward_func
        self.contrastive_forward = ContrastiveForward(self.model_forward, output_transform)
        self.method = _swap_forward(instance, self.contrastive_forward)
        GradientAttribution.__init__(self, self.model_forward)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.method.multiplies_by_inputs

    def has_convergence_delta(self) -> bool:
        return self.method.has_convergence_delta()

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        contrast: Any = None,
        additional_forward_args: Any = None,
        max_batch: int | None = None,
        **kwargs: Any,
    ) -> Any:
        r"""Attributions of the cross-entropy with the contrast class(es) Q.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): a batch, examples first.
            contrast (int, list, Tensor or str, optional): the class Q: an int, one per
                example (list or 1-D tensor), ``"all"``, or a 2-D selection of several
                classes per example. Default: None, each example's runner-up class. A
                per-example ``contrast`` of length N is expanded with the inputs inside
                NoiseTunnel, ``infidelity`` and ``sensitivity_max``.
            additional_forward_args (Any, optional): extra arguments of the model.
            max_batch (int, optional): with several classes per example, the (example,
                class) pairs are stacked into a batch of N * C' rows and handed to the
                wrapped method in calls of at most ``max_batch`` rows. Default: 64.
            **kwargs: any other argument of the wrapped method's ``attribute`` (baselines,
                n_steps, nt_type, ...). Per-example tensors are expanded with the rows.

        Returns:
            What the wrapped method returns for ``target=Q``; with several classes per
            example each tensor gets a class dimension after the batch: (N, C', ...).
        """
        if "target" in kwargs:
            raise TypeError(
                "Contrastive takes the contrast class as `contrast`, not `target` (the wrapped "
                "method's target is set to it)."
            )
        formatted = format_inputs(inputs)
        model = root_module(self.model_forward)
        with preserved_state([model]), torch.no_grad():
            logits = run_forward(
                self.model_forward,
                formatted,
                additional_forward_args,
                self.contrastive_forward.output_transform,
            )
        classes, multi = class_selection(contrast, logits, argument="contrast", default="runner_up")
        unwrap = not isinstance(inputs, tuple)
        # Captum's Saliency and GuidedBackprop switch requires_grad on for the tensors they
        # get and only switch it back on success: hand them detached views, never the user's.
        formatted = tuple(t.detach() for t in formatted)
        if not multi:
            return self.method.attribute(
                formatted[0] if unwrap else formatted,
                target=classes[:, 0],
                additional_forward_args=additional_forward_args,
                **kwargs,
            )
        return self._attribute_many(
            formatted, classes, additional_forward_args, max_batch, unwrap, kwargs
        )

    def _attribute_many(
        self, formatted, classes, additional_forward_args, max_batch, unwrap, kwargs
    ):
        n, per_example = classes.shape
        total = n * per_example
        rows_per_call = DEFAULT_ROWS_PER_CALL if max_batch is None else max_batch
        if (
            isinstance(rows_per_call, bool)
            or not isinstance(rows_per_call, int)
            or rows_per_call < 1
        ):
            raise ValueError(f"`max_batch` must be a positive int, got {max_batch!r}.")
        flat_targets = classes.reshape(-1)
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
                **{
                    key: repeat_per_example(value, n, per_example, rows)
                    for key, value in kwargs.items()
                },
            )
            pieces.append(result)
        return _join(pieces, n, per_example)


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
