r"""PathwayGradient (NeuronMCT): the gradient of the network pruned to its critical pathway."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from .._utils.batched_grad import (
    _CHUNK_BYTES,
    _training_batch_norms,
    objective_gradients,
    run_forward,
)
from .._utils.caller import inside_expanding_wrapper, user_stacklevel
from .._utils.hooks import call_hook, counted_output_bytes, registered_hooks
from .._utils.layers import is_exported, resolve_layer, root_module, user_model
from .._utils.model_state import gradients_on, leaves_inference_mode, preserved_state
from .._utils.precision import precise, precise_dtype
from .._utils.summaries import compact_repr, names_summary
from .._utils.validation import (
    check_flag,
    check_int,
    check_number,
    class_selection,
    format_inputs,
    select_examples,
)
from ._cam import warn_random_in_train_mode

SCORES = ("taylor", "integrated")


@dataclass
class PathwayGradientResult:
    """What :meth:`PathwayGradient.attribute` returns with ``return_pathway=True``.

    The neurons are the elements of the scored layers' outputs, one set per call of a layer
    (a module that runs twice in one forward pass, like the shared in-place ReLU of a
    torchvision ``BasicBlock``, gives two sets). ``sites`` names them: the module's dotted
    name, with ``#k`` appended (``"layer1.0.relu#1"``) when the module runs more than once.

    Attributes:
        attributions (Tensor or tuple of Tensor): the gradient of the pruned network, the
            shape of ``inputs`` (what ``attribute`` returns without ``return_pathway``).
        masks (dict[str, Tensor]): per site, the pathway: a bool tensor (N, ...) of the
            site's output shape, True for the neurons kept (``score > threshold``).
        scores (dict[str, Tensor]): per site, the neuron scores (N, ...), >= 0.
        threshold (Tensor): (N,) float64 (float32 on MPS), each example's threshold over all
            its neurons.
        target (Tensor): (N,) the class explained in each example.
        sites (tuple of str): the sites in the order they ran (the keys of ``masks``).
    """

    attributions: Tensor | tuple[Tensor, ...]
    masks: dict[str, Tensor]
    scores: dict[str, Tensor]
    threshold: Tensor
    target: Tensor
    sites: tuple[str, ...]

    def __repr__(self) -> str:
        # the shapes and dtypes, not the values: a ResNet-50's masks and scores of one image
        # printed in full are hundreds of kilobytes
        return compact_repr(
            self,
            masks=names_summary(self.masks, "site"),
            scores=names_summary(self.scores, "site"),
            sites=names_summary(self.sites, "site"),
        )


def percentile_threshold(values: Tensor | Sequence[Tensor], q: float) -> Tensor:
    r"""Row-wise ``numpy.percentile(values[n], 100 * q)`` (method ``"linear"``), batched.

    ``torch.quantile`` refuses inputs of more than about 16 million elements, which the
    neurons of one image of a large CNN exceed. This takes the two order statistics around
    the virtual index ``(M - 1) * q`` with ``torch.kthvalue`` (no sort) and interpolates them
    with numpy's formulas, in float64:

    .. code-block:: text

        v     = M q + (1 - q) - 1           (numpy's virtual index; alpha = beta = 1)
        lo    = floor(v),  hi = lo + 1      (both M - 1 when v >= M - 1)
        g     = v - lo
        tau   = a_lo + (a_hi - a_lo) g      if g < 0.5
                a_hi - (a_hi - a_lo)(1 - g) otherwise

    with ``a_k`` the k-th smallest value of the row (0-based). A row whose smallest value
    occurs at least ``hi + 1`` times has ``a_lo = a_hi`` = that value and needs no selection:
    the neuron scores of a ReLU network are mostly exact zeros (dead units, units a max-pool
    discards), so at the usual sparsities most rows are settled by one minimum and one count.

    Args:
        values (Tensor or sequence of Tensor): (N, M) values, M >= 1; or several (N, M_i)
            blocks whose columns together are the row (as if concatenated along dim 1, which
            is done only for the rows that need a selection).
        q (float): the quantile, in [0, 1] (the percentile divided by 100).

    Returns:
        Tensor: (N,) float64 thresholds (float32 on MPS, which has no float64), on the device
        of ``values``.
    """
    blocks = [values] if isinstance(values, Tensor) else list(values)
    m = sum(block.shape[1] for block in blocks)
    virtual = m * q + (1.0 + q * (1.0 - 1.0 - 1.0)) - 1.0
    if virtual >= m - 1:
        lo = hi = m - 1
    elif virtual < 0:
        lo = hi = 0
    else:
        lo = math.floor(virtual)
        hi = lo + 1
    gamma = virtual - math.floor(virtual)
    smallest = torch.stack([block.amin(dim=1) for block in blocks]).amin(dim=0)
    ties = sum((block == smallest[:, None]).sum(dim=1, dtype=torch.int32) for block in blocks)
    settled = ties >= hi + 1
    threshold = precise(smallest)
    if bool(settled.all()):
        return threshold
    rest = None if not bool(settled.any()) else ~settled
    rows = torch.cat([block if rest is None else block[rest] for block in blocks], dim=1)
    low_value = rows.kthvalue(lo + 1, dim=1, keepdim=True).values
    if hi == lo:
        high_value = low_value
    else:
        # the next order statistic without a second selection: a_lo again when it occurs more
        # than lo + 1 times, else the smallest value above it
        above = rows > low_value
        repeated = (rows.shape[1] - above.sum(dim=1, keepdim=True)) > lo + 1
        smallest_above = torch.where(above, rows, torch.full_like(rows, math.inf))
        high_value = torch.where(repeated, low_value, smallest_above.amin(dim=1, keepdim=True))
    low, high = precise(low_value[:, 0]), precise(high_value[:, 0])
    diff = high - low
    selected = high - diff * (1.0 - gamma) if gamma >= 0.5 else low + diff * gamma
    if rest is None:
        return selected
    threshold[rest] = selected
    return threshold


def _round_down(threshold: Tensor, dtype: torch.dtype) -> Tensor:
    """The largest ``dtype`` number <= each float64 threshold: for scores of that dtype,
    ``s > threshold`` (compared exactly) is ``s > _round_down(threshold)``."""
    if dtype == threshold.dtype:
        return threshold
    rounded = threshold.to(dtype)
    too_big = rounded.to(threshold.dtype) > threshold
    return torch.where(
        too_big, torch.nextafter(rounded, torch.full_like(rounded, -math.inf)), rounded
    )


class _Sites:
    """Forward hooks on the scored modules that count calls, so that each call is a site.

    ``mode`` decides what a hook does with a call's output:

    - ``"gate"``: return ``output + g`` with ``g`` a zeros tensor requiring grad (kept in
      ``gates``, the output in ``outputs``); ``d y / d g = d y / d a`` whatever in-place
      operations follow.
    - ``"mask"``: return ``output * mask`` with the site's fixed mask (the pruned network).
    - ``"probe"``: at the site ``probe_site`` only, return ``output * alpha + z`` (``alpha``
      one scale per row, ``z`` zeros requiring grad): ``d y / d z`` is the gradient with
      respect to the scaled activation; other sites pass through.

    The first pass records the calls (module, per-example shape); later passes must make the
    same calls in the same order.
    """

    def __init__(self, modules: list[nn.Module], names: list[str]) -> None:
        self.modules = modules
        self.names = names
        self.mode = "gate"
        self.calls: list[tuple[int, tuple[int, ...]]] | None = None
        self.recording: list[tuple[int, tuple[int, ...]]] = []
        self.position = 0
        self.counts: list[int] = [0] * len(modules)
        self.gates: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.probe_site = -1
        self.alpha: Tensor | None = None
        self.probe: Tensor | None = None
        self.probe_output: Tensor | None = None

    def start(self, mode: str) -> None:
        self.mode = mode
        self.position = 0
        self.counts = [0] * len(self.modules)
        self.gates = []
        self.outputs = []

    def hook(self, index: int) -> Callable:
        def on_output(module, args, output):
            if not isinstance(output, Tensor) or not output.is_floating_point():
                got = type(output).__name__ if not isinstance(output, Tensor) else output.dtype
                raise TypeError(
                    f"`layers`: {self.names[index]} ({type(module).__name__}) returns {got}; "
                    "every scored layer must return one floating-point tensor."
                )
            if _in_backward_pass():
                raise RuntimeError(
                    f"PathwayGradient: {self.names[index]} ran again during the backward pass: "
                    "the model recomputes it there (activation checkpointing, "
                    "torch.utils.checkpoint), so its gates and masks would not be the ones "
                    "scored. Turn checkpointing off while explaining (e.g. timm's "
                    "model.set_grad_checkpointing(False), Hugging Face's "
                    "model.gradient_checkpointing_disable())."
                )
            site = self.position
            self.position += 1
            self.counts[index] += 1
            shape = tuple(output.shape[1:])
            if self.calls is None or self.mode == "gate":
                if self.calls is None:
                    self.recording.append((index, shape))
                gate = torch.zeros_like(output).requires_grad_(True)
                self.gates.append(gate)
                self.outputs.append(output.detach())
                return output + gate
            if site >= len(self.calls) or self.calls[site] != (index, shape):
                raise RuntimeError(
                    "PathwayGradient: the model made different calls of the scored layers in "
                    f"two forward passes of the same inputs (call {site} is "
                    f"{self.names[index]} with shape {shape}); the pathway of a model whose "
                    "control flow changes between passes is not defined."
                )
            if self.mode == "mask":
                return output * self.masks[site].to(output.dtype)
            if site == self.probe_site:
                self.probe_output = output.detach()
                self.probe = torch.zeros_like(output).requires_grad_(True)
                alpha = self.alpha.to(output.dtype).reshape(-1, *([1] * (output.dim() - 1)))
                return output * alpha + self.probe
            return None

        return on_output

    def site_names(self) -> list[str]:
        runs = [0] * len(self.modules)
        for index, _ in self.calls:
            runs[index] += 1
        seen = [0] * len(self.modules)
        names = []
        for index, _ in self.calls:
            name = self.names[index]
            if runs[index] > 1:
                name = f"{name}#{seen[index]}"
            seen[index] += 1
            names.append(name)
        return names


def _in_backward_pass() -> bool:
    """Whether autograd is running a backward pass on this thread (a forward hook firing
    then is a recomputation by activation checkpointing)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


#: activation modules that are not hidden units of their own: squashing functions that
#: serve as gates (squeeze-excitation: Sigmoid, Hardsigmoid) or output heads, normalisers,
#: and attention (a module of torch.nn.modules.activation too)
_NOT_HIDDEN_ACTIVATIONS = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.LogSigmoid,
    nn.Softmax,
    nn.Softmin,
    nn.LogSoftmax,
    nn.Softmax2d,
    nn.MultiheadAttention,
)
#: the other activation modules of torch (GELU, SiLU, Hardswish, LeakyReLU, ReLU6, ...)
_HIDDEN_ACTIVATIONS = tuple(
    cls
    for cls in vars(nn.modules.activation).values()
    if isinstance(cls, type)
    and issubclass(cls, nn.Module)
    and cls.__module__ == "torch.nn.modules.activation"
    and not issubclass(cls, _NOT_HIDDEN_ACTIVATIONS)
)


class _UnscoredActivationsWarning(UserWarning):
    """PathwayGradient's default scored only the ``nn.ReLU`` outputs of a model with other
    hidden activations; ``relus`` and ``others`` (activation class name -> modules) say which
    (read by the report, which words it for its reader)."""

    def __init__(self, message: str, relus: int, others: dict[str, int]) -> None:
        super().__init__(message)
        self.relus, self.others = relus, others


def hidden_activation_counts(model: nn.Module) -> dict[str, int]:
    """The hidden activation modules of ``model`` other than ``nn.ReLU`` (GELU, SiLU,
    Hardswish, LeakyReLU, ReLU6, ...; not the gates, heads and normalisers of
    ``_NOT_HIDDEN_ACTIVATIONS``), as class name -> number of modules: what the methods that
    act on ``nn.ReLU`` modules only (PathwayGradient's default, VOICE(GuidedBackprop)) leave
    out."""
    counts: dict[str, int] = {}
    for m in user_model(model).modules():
        if isinstance(m, _HIDDEN_ACTIVATIONS):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def _warn_unscored_activations(model: nn.Module) -> None:
    """Warn that ``layers=None`` scores the ``nn.ReLU`` modules only when the model has
    other hidden activations too (MobileNetV3's Hardswish): the pathway then covers part of
    the network, mostly the ReLUs of its squeeze-excitation gates."""
    counts = hidden_activation_counts(model)
    if not counts:
        return
    relus = sum(isinstance(m, nn.ReLU) for m in user_model(model).modules())
    others = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    kinds = ", ".join(f"nn.{name}" for name in sorted(counts))
    warning = _UnscoredActivationsWarning(
        f"PathwayGradient: with `layers=None` the neurons are the outputs of the {relus} "
        f"nn.ReLU module(s) of {type(model).__name__} only; its other activations ({others}) "
        "are neither scored nor pruned, so the pathway covers part of the network. To include "
        "them, pass them as `layers`, e.g. [name for name, m in model.named_modules() if "
        f"isinstance(m, (nn.ReLU, {kinds}))].",
        relus,
        dict(sorted(counts.items())),
    )
    warnings.warn(warning, stacklevel=user_stacklevel())


class PathwayGradient(GradientAttribution):
    r"""PathwayGradient (NeuronMCT): the input gradient of the network's critical pathway.

    Per example, every hidden neuron i (every element of the output of every ``nn.ReLU``
    call, or of the given ``layers``) gets a contribution score; the neurons below a global
    percentile of those scores are pruned (their output is set to 0 by a forward hook) and
    the attribution is the gradient of the target logit of the pruned network:

    .. code-block:: text

        s_i  = | a_i * d y / d a_i |                       (score="taylor", one backward)
        s_i  = | a_i * mean_{alpha in [0, 1]} d y / d (alpha a_i) |
                                                           (score="integrated": the layer of
                                                            i scaled by alpha, n_steps points)
        tau  = numpy.percentile(s over all neurons of the example, 100 * sparsity)
        M_i  = 1[s_i > tau]                                (dead units, s = 0, always pruned)
        attr = d y_pruned / d x,  y_pruned = y with every a_i replaced by M_i a_i

    ``y`` is the target logit (the prediction by default), as in the reference code.
    ``multiply_by_inputs=True`` returns ``x * attr``. The threshold is one per example over
    all scored neurons together (numpy's linear interpolation, computed with
    ``torch.kthvalue`` so that any number of neurons works; see
    :func:`~captum_ext.attr.pathway_gradient.percentile_threshold`). Cost: one forward and
    backward to score and one to take the gradient (about twice Saliency); ``"integrated"``
    adds one forward and backward of ``n_steps`` copies of the batch per site, in passes of
    ``internal_batch_size`` rows (by default as many as keep the module outputs of a pass, and
    their gradients, near 1 GiB; for a model that normalises with the statistics of its batch,
    all at once where they fit, else near-equal passes of two rows or more, with a warning).

    With ``sparsity=0`` only the neurons of the lowest score are pruned, which in a ReLU
    network are the dead units (s = 0) and those that do not reach the output (max-pooled
    away): the result is Captum's ``Saliency(abs=False)``.

    **Sites.** A module that runs several times in one forward pass (torchvision's ResNet
    blocks call one in-place ReLU twice) is scored and pruned per call: each call is its own
    set of neurons. The hooks multiply the output by a new tensor, so in-place ReLUs work.
    Functional ReLUs (``torch.relu`` in ``forward``) cannot be hooked: pass the modules to
    prune as ``layers``. The model must make the same calls in every pass.

    Batches: examples are independent (with the model in eval mode), so a batch gives the
    rows of the examples one by one; ``NoiseTunnel(PathwayGradient(model))`` works
    (``return_pathway`` is for direct calls). ``target`` has one class per example.

    ``score="integrated"`` integrates from 0 to 1 (``torch.linspace(0, 1, n_steps)``); the
    reference code accumulates its step and so scales from 0 to 5.5 (noted in the spec).

    Paper: A. Khakzar, S. Baselizadeh, S. Khanduja, C. Rupprecht, S. T. Kim, N. Navab,
    "Neural Response Interpretation through the Lens of Critical Pathways", CVPR 2021.

    Args:
        forward_func (Callable): the model (or a function calling it) returning (N, C)
            logits. With ``layers=None`` it must be an ``nn.Module`` or a bound method of
            one, whose ``nn.ReLU`` modules are scored (with a warning when it has other
            hidden activations too; see ``attribute``'s ``layers``).
        multiply_by_inputs (bool, optional): default of ``attribute``'s
            ``multiply_by_inputs``. Default: False.

    Examples::

        >>> from captum_ext.attr import PathwayGradient
        >>> pathway = PathwayGradient(model)
        >>> attr = pathway.attribute(x, target=labels[:4], sparsity=0.7)  # (4, 1, 28, 28)
        >>> result = pathway.attribute(x, sparsity=0.7, return_pathway=True)
        >>> result.sites
        ('features.1', 'features.4', 'features.7')
        >>> kept = sum(int(m[0].sum()) for m in result.masks.values())
        >>> neurons = sum(m[0].numel() for m in result.masks.values())
        >>> kept <= 0.3 * neurons
        True
    """

    def __init__(self, forward_func: Callable, multiply_by_inputs: bool = False) -> None:
        multiply_by_inputs = check_flag(multiply_by_inputs, "multiply_by_inputs")
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def _modules(self, layers: Any) -> tuple[list[nn.Module], list[str]]:
        model = root_module(self.forward_func)
        if layers is None:
            if model is None:
                raise ValueError(
                    "`layers`: forward_func is not an nn.Module (nor a bound method of one), "
                    "so its ReLUs cannot be found; pass the modules to score as `layers`."
                )
            if isinstance(model, torch.jit.ScriptModule) or is_exported(model):
                what = (
                    "a TorchScript model, whose compiled modules take no forward hooks"
                    if isinstance(model, torch.jit.ScriptModule)
                    else "the module of a torch.export program, whose ReLUs are graph "
                    "operators, not modules"
                )
                raise TypeError(
                    f"`forward_func` is {what}: PathwayGradient hooks the output of every ReLU. "
                    "Explain the eager model."
                )
            # names as in the model the user built (inside DataParallel's wrapper and
            # Contrastive's ContrastiveForward too), the names CircuitReadout gives its stages
            named = user_model(model).named_modules()
            found = [(name, m) for name, m in named if isinstance(m, nn.ReLU)]
            if not found:
                others = sorted(
                    {
                        type(m).__name__
                        for m in model.modules()
                        if type(m).__module__ == "torch.nn.modules.activation"
                    }
                )
                has = f" (its activations: {', '.join(others)})" if others else ""
                raise ValueError(
                    f"`layers`: {type(model).__name__} has no nn.ReLU module to score{has}; "
                    "PathwayGradient's neurons are ReLU outputs, and a functional relu cannot "
                    "be hooked. Pass the modules whose outputs are the neurons as `layers`."
                )
            _warn_unscored_activations(model)
            return [m for _, m in found], [name or "<model>" for name, _ in found]
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        if not isinstance(layers, Sequence) or not layers:
            raise ValueError(
                "`layers` must be a non-empty list of modules or dotted module names, got "
                f"{layers!r}."
            )
        modules = [resolve_layer(self.forward_func, layer, argument="layers") for layer in layers]
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError("`layers` lists a module twice.")
        names = {}
        if model is not None:
            names = {id(m): name for name, m in user_model(model).named_modules()}
        return modules, [names.get(id(m), type(m).__name__) or "<model>" for m in modules]

    @log_usage()
    @leaves_inference_mode
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        sparsity: float = 0.7,
        layers: Sequence[str | nn.Module] | None = None,
        score: str = "taylor",
        multiply_by_inputs: bool | None = None,
        return_pathway: bool = False,
        additional_forward_args: Any = None,
        n_steps: int = 11,
        internal_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor, ...] | PathwayGradientResult:
        r"""The gradient of the pruned network (its critical pathway) for each example.

        Args:
            inputs (Tensor or tuple of Tensor): the batch, examples first; floating point.
            target (int, list, tuple or Tensor, optional): the class whose logit is
                explained, one per example, in the forms Captum accepts for (N, C) logits
                (an (N, 1) tensor too).
                Default: None, the predicted class.
            sparsity (float, optional): the share of neurons pruned, in [0, 1): the
                threshold is the ``100 * sparsity``-th percentile of each example's scores.
                The authors used 0.7 (ResNet-50, sanity checks) to 0.9 (VGG-16).
                Default: 0.7.
            layers (list of str or nn.Module, optional): the modules whose outputs are the
                neurons. Default: None, every ``nn.ReLU`` of the model. A model that has
                other hidden activation modules too (``nn.Hardswish``, ``nn.GELU``,
                ``nn.SiLU``, ``nn.LeakyReLU``, ``nn.ReLU6``, ...; not the gates and heads
                ``nn.Sigmoid``, ``nn.Hardsigmoid``, ``nn.Tanh``, nor softmax) gets a
                ``UserWarning`` naming them: only its ReLUs are scored (on MobileNetV3,
                mostly those of the squeeze-excitation gates); list them in ``layers`` to
                include them.
            score (str, optional): ``"taylor"`` (``|a dy/da|``) or ``"integrated"``
                (``|a|`` times the mean gradient along the layer scaled from 0 to 1).
                Default: "taylor".
            multiply_by_inputs (bool, optional): multiply the gradient by the inputs.
                Default: None, the value given to the constructor (False).
            return_pathway (bool, optional): return a :class:`PathwayGradientResult` with
                the masks, scores and thresholds as well; for direct calls only (inside
                Captum's NoiseTunnel, ``infidelity`` or ``sensitivity_max`` it raises a
                ``ValueError``). Default: False.
            additional_forward_args (Any, optional): extra arguments for forward_func,
                after the inputs. With ``score="integrated"`` each pass of (example, step)
                rows gets its examples' rows of every tensor whose first dimension is N,
                also inside tuples, lists, mappings and dataclasses (a shared table with N
                rows too: bind it in a closure); everything else unchanged. Default: None.
            n_steps (int, optional): points of the integral for ``score="integrated"``
                (including both ends; the reference uses 11). Default: 11.
            internal_batch_size (int, optional): rows (example, step) per forward and
                backward pass of ``score="integrated"``, whose ``n_steps x N`` rows would
                otherwise all run at once (Captum's ``IntegratedGradients`` has the same
                argument). Honoured as given: passes of that many rows, the last one the
                rest. A model that normalises with the statistics of its batch (a batch
                norm in train mode, or one built with ``track_running_stats=False``)
                normalises each pass's rows together, so there its scores depend on this
                (and a pass of one row fails with torch's "Expected more than 1 value per
                channel when training"). Default: None: passes of near-equal size, as few
                as keep the module outputs of a pass and their gradients within about 1 GiB
                (measured on the first pass); for a model normalising with batch
                statistics, all rows in one pass where they fit, otherwise passes of two
                rows or more, with a warning that the scores depend on the pass size.

        Returns:
            Tensor or tuple of Tensor: the attributions, the shape of ``inputs``; a
            :class:`PathwayGradientResult` with ``return_pathway=True``.
        """
        sparsity = check_number(sparsity, "sparsity", minimum=0.0, allow_minimum=True)
        if sparsity >= 1.0:
            hint = f" (a fraction: {sparsity:g}% is {sparsity / 100:g})" if sparsity < 100 else ""
            raise ValueError(
                f"`sparsity` must be in [0, 1), the share of neurons pruned, got "
                f"{sparsity!r}{hint}."
            )
        if score not in SCORES:
            raise ValueError(f"`score`={score!r}: expected one of {SCORES}.")
        if multiply_by_inputs is None:
            multiply_by_inputs = self._multiply_by_inputs
        multiply_by_inputs = check_flag(multiply_by_inputs, "multiply_by_inputs")
        return_pathway = check_flag(return_pathway, "return_pathway")
        if return_pathway and inside_expanding_wrapper():
            # Captum's wrapper expects attributions shaped like the inputs, and its rows are
            # noisy copies of the examples: a PathwayGradientResult means nothing to it
            raise ValueError(
                "`return_pathway`=True is for direct calls: inside Captum's NoiseTunnel, "
                "infidelity or sensitivity_max the result must be attributions shaped like "
                "the inputs. Call PathwayGradient(...).attribute(..., return_pathway=True) "
                "directly for the masks, scores and thresholds."
            )
        n_steps = check_int(n_steps, "n_steps", minimum=2)
        if internal_batch_size is not None:
            internal_batch_size = check_int(internal_batch_size, "internal_batch_size")
        unwrap = not isinstance(inputs, tuple)
        formatted = format_inputs(inputs)
        for i, tensor in enumerate(formatted):
            if not tensor.is_floating_point():
                where = "inputs" if len(formatted) == 1 else f"inputs[{i}]"
                raise TypeError(
                    f"`{where}` must be floating point to differentiate, got {tensor.dtype}."
                )
        modules, names = self._modules(layers)
        sites = _Sites(modules, names)
        model = root_module(self.forward_func)
        warn_random_in_train_mode("PathwayGradient", model)
        registrations = [call_hook(m, sites.hook(i)) for i, m in enumerate(modules)]
        with (
            preserved_state([model, *modules], hidden_model=model is None),
            registered_hooks(*registrations),
            gradients_on(),
        ):
            x = tuple(t.detach() for t in formatted)
            # 1. score: one forward with gates, one backward of the target logits
            sites.start("gate")
            with counted_output_bytes() if score == "integrated" else nullcontext() as counted:
                logits = run_forward(
                    self.forward_func, x, additional_forward_args, takes_output_transform=False
                )
            classes, multi = class_selection(target, logits, argument="target", default="predicted")
            # an (N, 1) target names one class per example, as (N,) does (as in FinerCAM)
            if multi and classes.shape[1] != 1:
                raise ValueError(
                    "`target` must give one class per example; PathwayGradient prunes one "
                    "pathway per (example, class)."
                )
            sites.calls = sites.recording
            if not sites.calls:
                raise ValueError(
                    f"`layers`: none of the scored modules ({', '.join(names[:5])}"
                    f"{', ...' if len(names) > 5 else ''}) ran in the forward pass."
                )
            gates, sites.gates = sites.gates, []
            outputs, sites.outputs = sites.outputs, []
            n = x[0].shape[0]
            if score == "taylor":
                selected = logits.gather(1, classes).sum()
                found = objective_gradients(selected, gates, allow_unused=True)
                scores = [
                    torch.zeros_like(a) if d is None else (a * d.detach()).abs_()
                    for a, d in zip(outputs, found)
                ]
                reached = _reached(found, n)
                del found, selected
            else:
                del logits  # the first pass only gave the classes and the calls
                rows = n_steps * n
                if internal_batch_size is not None:
                    bounds = [*range(0, rows, internal_batch_size), rows]
                else:  # a backward keeps about one gradient per output it goes through:
                    # twice the outputs' bytes per row
                    per_row = 2 * counted.total / max(n, 1)
                    size = max(1, int(_CHUNK_BYTES // max(per_row, 1)))
                    batch_statistics = _training_batch_norms(model)
                    if batch_statistics and size < rows:
                        _warn_batch_statistics_passes(rows)
                    # batch statistics: every row together when they fit, else passes of
                    # two rows or more (one row alone fails in a training batch norm)
                    bounds = _even_bounds(rows, size, min_rows=2 if batch_statistics else 1)
                scores, reached = self._integrated_scores(
                    sites, x, classes, additional_forward_args, n_steps, bounds
                )
            del gates, outputs
            # 2. one threshold per example over all neurons
            threshold = percentile_threshold([s.reshape(n, -1) for s in scores], sparsity)
            sites.masks = [
                s > _round_down(threshold, s.dtype).reshape(-1, *([1] * (s.dim() - 1)))
                for s in scores
            ]
            # 3. the gradient of the pruned network
            sites.start("mask")
            leaves = tuple(t.detach().requires_grad_(True) for t in x)
            pruned = run_forward(
                self.forward_func, leaves, additional_forward_args, takes_output_transform=False
            )
            self._check_all_ran(sites)
            grads = objective_gradients(pruned.gather(1, classes).sum(), leaves, allow_unused=True)
            attributions = tuple(
                torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, grads)
            )
            if multiply_by_inputs:
                attributions = tuple(g * t for g, t in zip(attributions, x))
        _warn_if_unreached(reached, model)
        result = attributions[0] if unwrap else attributions
        if not return_pathway:
            return result
        keys = tuple(sites.site_names())
        return PathwayGradientResult(
            attributions=result,
            masks=dict(zip(keys, sites.masks)),
            scores=dict(zip(keys, scores)),
            threshold=threshold,
            target=classes[:, 0],
            sites=keys,
        )

    @staticmethod
    def _check_all_ran(sites: _Sites) -> None:
        if sites.position != len(sites.calls):
            raise RuntimeError(
                "PathwayGradient: the model made fewer calls of the scored layers in a later "
                f"forward pass ({sites.position}) than in the first ({len(sites.calls)}); the "
                "pathway of a model whose control flow changes between passes is not defined."
            )

    def _integrated_scores(
        self,
        sites: _Sites,
        x: tuple[Tensor, ...],
        classes: Tensor,
        additional_forward_args: Any,
        n_steps: int,
        bounds: list[int],
    ) -> tuple[list[Tensor], Tensor]:
        """Per site: |a * mean over alpha of dy/d(alpha a)|, the site scaled alone, and which
        examples had a nonzero gradient at some site (:func:`_reached`). The
        ``n_steps x N`` rows (step-major: every example at alpha_0, then at alpha_1, ...) run
        in passes ``bounds[i]:bounds[i + 1]``; each example's gradients are summed over its
        rows."""
        n = x[0].shape[0]
        alphas = torch.linspace(
            0.0, 1.0, n_steps, dtype=precise_dtype(x[0].device), device=x[0].device
        )
        scores = []
        totals: list[Tensor | None] = []
        for site in range(len(sites.calls)):
            total: Tensor | None = None
            activation: Tensor | None = None
            for start, stop in zip(bounds[:-1], bounds[1:]):
                row = torch.arange(start, stop, device=x[0].device)
                example = row % n
                sites.start("probe")
                sites.probe_site = site
                sites.alpha = alphas[row // n]
                logits = run_forward(
                    self.forward_func,
                    tuple(t[example.to(t.device)] for t in x),
                    select_examples(additional_forward_args, n, example),
                    takes_output_transform=False,
                )
                self._check_all_ran(sites)
                probe, output = sites.probe, sites.probe_output
                sites.probe = sites.probe_output = None
                (grad,) = objective_gradients(
                    logits.gather(1, classes[example.to(classes.device)]).sum(),
                    [probe],
                    allow_unused=True,
                )
                del logits, probe
                if activation is None:
                    activation = output.new_zeros((n, *output.shape[1:]))
                first = (row < n).to(output.device)  # step 0; the unscaled output is that of
                if bool(first.any()):  # every step
                    activation[example.to(output.device)[first]] = output[first]
                if grad is not None:
                    if total is None:
                        total = grad.new_zeros((n, *grad.shape[1:]))
                    total.index_add_(0, example.to(grad.device), grad.detach())
            if total is None:
                scores.append(torch.zeros_like(activation))
            else:
                scores.append((total / n_steps * activation).abs())
            totals.append(total)
        sites.probe_site = -1
        return scores, _reached(totals, n)


def _even_bounds(rows: int, size: int, min_rows: int = 1) -> list[int]:
    """Boundaries of passes over ``rows`` rows of at most ``size`` rows each (at most
    ``max(size, min_rows)`` where ``size < min_rows``), of near-equal size:
    ``ceil(rows / size)`` passes, fewer where a pass would hold under ``min_rows`` rows
    (every pass holds ``min_rows`` rows or more when ``rows >= min_rows``); the larger ones
    first."""
    size = max(size, min_rows, 1)
    passes = max(1, min(math.ceil(rows / size), rows // max(min_rows, 1)))
    small, larger = divmod(rows, passes)
    return [i * small + min(i, larger) for i in range(passes + 1)]


def _warn_batch_statistics_passes(rows: int) -> None:
    """Warn that the ``rows`` rows of ``score="integrated"`` on a model that normalises with
    the statistics of its batch run in several passes, so its scores depend on their size."""
    warnings.warn(
        f"PathwayGradient: the model normalises with the statistics of its batch (a batch norm "
        f"in train mode, or one built with track_running_stats=False), and the {rows} rows of "
        '`score="integrated"` do not fit one pass of the memory budget, so they run in several '
        "passes that are normalised separately: the scores depend on the pass size. A model "
        "in train mode: call `model.eval()` first; otherwise (batch norms without running "
        f"statistics) `internal_batch_size={rows}` runs them in one pass, if memory allows.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _reached(gradients: Sequence[Tensor | None], n: int) -> Tensor:
    """(N,) bool: whether the gradients of the scoring pass, one tensor per site (None where
    the objective does not depend on it), are nonzero anywhere for each example."""
    reached = torch.zeros(n, dtype=torch.bool)
    for gradient in gradients:
        if gradient is not None and gradient.numel():
            nonzero = (gradient.detach().reshape(n, -1) != 0).any(dim=1)
            reached |= nonzero.cpu()
    return reached


def _warn_if_unreached(reached: Tensor, model: nn.Module | None) -> None:
    """Warn where the target logit has no gradient at any scored neuron of an example: the
    output does not depend on the neurons through autograd (a backbone run under
    ``torch.no_grad()`` in ``forward``, or whose output is detached), so every score is 0,
    every neuron is pruned and the attribution is zero. A pathway pruned at high sparsity
    does not cause this: the scores come before any pruning."""
    blank = (~reached).nonzero().flatten().tolist()
    if not blank:
        return
    which = (
        "every example"
        if len(blank) == len(reached)
        else f"{len(blank)} of the {len(reached)} examples (rows "
        + ", ".join(map(str, blank[:8]))
        + (", ...)" if len(blank) > 8 else ")")
    )
    message = (
        f"PathwayGradient: the gradients at the scored layers' outputs are exactly zero for "
        f"{which}, so every neuron scores 0 and all are pruned: the attribution is only the "
        "gradient through paths around the scored layers (zero where there are none). The "
        "target logit does not depend on the scored neurons through autograd: "
        "torch.no_grad() or .detach() inside forward (a frozen backbone), or a quantized "
        "model, are the usual causes."
    )
    warnings.warn(message, UserWarning, stacklevel=user_stacklevel())
