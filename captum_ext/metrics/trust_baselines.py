r"""The per-example trust baselines GradTrust is compared with.

From the logits: :func:`softmax_confidence`, :func:`energy`, :func:`negative_entropy`,
:func:`margin`, :func:`log_likelihood`; from an input perturbation: :func:`odin`; from
several stochastic passes: :func:`mc_dropout`; from gradients of parameters: :func:`gradnorm`
and :func:`purview` (computed by the engine in :mod:`captum_ext._utils.batched_grad`).

Every function takes ``forward_func`` (a model returning (N, C) logits, or any output with
``output_transform`` mapping it to them), ``inputs`` (a tensor or a tuple of tensors, batch
first) and keyword options, and returns an (N,) tensor on the device of the logits, in their
dtype (float32 for a half-precision model's: float16 rounds every probability above about 0.99976 to
1). **Higher always means more trusted.** The model is left exactly as it was found.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from captum.log import log_usage
from torch import Tensor, nn
from torch.nn.utils import parametrize

from captum_ext._utils.batched_grad import (
    input_gradients,
    log_softmax_precise,
    logits_seen_per_example,
    looks_like_probabilities,
    per_example_parameter_gradients,
    run_forward,
    softmax_complement,
)
from captum_ext._utils.caller import user_stacklevel
from captum_ext._utils.layers import execution_ranks, owned_parameters, resolve_layer, root_module
from captum_ext._utils.model_state import preserved_state
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.seeding import as_generator
from captum_ext._utils.validation import (
    check_int,
    check_number,
    check_several_classes,
    format_additional_forward_args,
    format_inputs,
)
from captum_ext.metrics._trust_common import (
    _check_transform,
    _forward_recording,
    _head_features,
    _logits,
    _resolve_head,
    _weight_of,
)

__all__ = [
    "energy",
    "gradnorm",
    "log_likelihood",
    "margin",
    "mc_dropout",
    "negative_entropy",
    "odin",
    "purview",
    "softmax_confidence",
]


def _log_probability_tolerance(dtype: torch.dtype) -> float:
    """How far from 0 a row of log-probabilities' log-sum-exp may be: rounding of a
    log-softmax in ``dtype`` (1e-4 in float32 / float64, 2e-2 in half precision). Tight, as
    real logits whose every row has a log-sum-exp within it are refused (for one row, about
    1 in 10^4 by chance, and that is only warned of)."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def _log_probability_rows(logits: Tensor) -> int:
    """The number of rows (NaN rows aside) of the (N, C >= 2) ``logits`` if every one has a
    log-sum-exp of 0 within :func:`_log_probability_tolerance`: log-probabilities (a
    ``log_softmax`` output, or ``log_probabilities`` of a softmax), which are the logits less
    each row's log-sum-exp. Read in float64; 0 for anything else."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        return 0
    if not logits.is_floating_point() or logits.device.type == "meta":
        return 0
    with torch.no_grad():
        rows = _finite_rows(logits)
        if not rows.shape[0]:
            return 0
        spread = torch.logsumexp(rows.double(), dim=1).abs().max()
        return rows.shape[0] if bool(spread <= _log_probability_tolerance(_held_in(rows))) else 0


def _finite_rows(logits: Tensor) -> Tensor:
    """The rows of ``logits`` without NaN, detached."""
    rows = logits.detach()
    return rows[~torch.isnan(rows).any(dim=1)]


def _held_in(rows: Tensor) -> torch.dtype:
    """The narrowest floating dtype that holds ``rows`` exactly: a half-precision model's
    log-probabilities cast to float32 (``output_transform=lambda o: o.float()``) were
    rounded in half precision, and their log-sum-exp is that far from 0. Whole numbers
    (integer or counting logits, which half precision also holds) keep their own dtype:
    log-probabilities rounded in half precision are almost never all whole."""
    if bool((rows == rows.round()).all()):
        return rows.dtype
    for narrow in (torch.float16, torch.bfloat16):
        if rows.dtype != narrow and torch.equal(rows.to(narrow).to(rows.dtype), rows):
            return narrow
    return rows.dtype


def _check_real_logits(
    logits: Tensor, output_transform: Callable | None, what: str, why: str
) -> None:
    """Refuse, for ``what`` (a score that reads the logits' per-row level, not only their
    softmax), outputs that are probabilities or log-probabilities, and the
    ``log_probabilities`` output transform: the logits of such a model are known only up
    to a constant per row, which ``why`` says the score depends on."""
    from captum_ext.data.loading import log_probabilities

    rows = 0  # rows read as log-probabilities by their values (one alone: a warning)
    if output_transform is log_probabilities:
        found = "`output_transform` is captum_ext.data.log_probabilities"
    elif looks_like_probabilities(logits):
        found = "the model's outputs are probabilities (every row is non-negative and sums to 1)"
    elif rows := _log_probability_rows(logits):
        found = (
            "the model's outputs are log-probabilities (every row's log-sum-exp is 0 within "
            f"{_log_probability_tolerance(_held_in(_finite_rows(logits))):g}: a final "
            "log_softmax)"
        )
    else:
        return
    message = (
        f"{what} needs the model's real logits z, but {found}. Probabilities and "
        "log-probabilities (log p = z - logsumexp(z)) have lost a constant per row of the "
        f"logits, which the softmax scores ignore but {why}; no transform gets it back. Score "
        "the model without its final softmax / log_softmax (the logits before it), or use a "
        "score read from the softmax alone (softmax, entropy, margin, log_likelihood)."
    )
    if rows == 1:  # one row of real logits falls there by chance now and then: warn only
        warnings.warn(
            message + " (One example only, whose real logits may have a log-sum-exp this "
            "close to 0 by chance: scored as given.)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
        return
    raise ValueError(message)


DEFAULT_ODIN_TEMPERATURE = 100.0
DEFAULT_ODIN_EPSILON = 0.0014
DEFAULT_MC_PASSES = 20


def softmax_confidence(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Maximum softmax probability (Hendrycks and Gimpel, ICLR 2017).

    .. code-block:: text

        score = max_c softmax(z)_c

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [1/C, 1], higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import softmax_confidence
        >>> scores = softmax_confidence(model, images)
    """
    logits = at_least_float32(
        _logits(forward_func, inputs, additional_forward_args, output_transform)
    )
    check_several_classes(logits, "softmax_confidence takes a softmax over the classes")
    return torch.softmax(logits, 1).amax(1)


@log_usage()
def energy(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    temperature: float = 1.0,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Negative free energy of the logits (Liu et al., "Energy-based Out-of-distribution
    Detection", NeurIPS 2020).

    .. code-block:: text

        score = T log sum_c exp(z_c / T)      (= -E(x; f), higher = more in-distribution)

    Unlike the maximum softmax probability it keeps the logits' scale, which is what makes
    it a stronger out-of-distribution score.

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        temperature (float, optional): T > 0. Default: 1.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores, higher = more trusted (more in-distribution).

    Raises:
        ValueError: the model has one output (pass
            ``output_transform=captum_ext.data.two_class_logits``), or its outputs are not
            its logits but probabilities or log-probabilities (every row's log-sum-exp is 0,
            a final ``softmax`` / ``log_softmax``), or ``output_transform`` is
            :func:`~captum_ext.data.log_probabilities`: those are the logits less each row's
            log-sum-exp, which is what the energy measures (0 for every input at T = 1).
            Score such a model without its final softmax.

    Examples::

        >>> from captum_ext.metrics import energy
        >>> scores = energy(model, images)
    """
    t = check_number(temperature, "temperature")
    logits = _logits(forward_func, inputs, additional_forward_args, output_transform)
    check_several_classes(
        logits,
        "energy takes a log-sum-exp over the classes",
        why="that of one output is the logit itself, which ranks the positive class, not "
        "the confidence of the prediction",
    )
    _check_real_logits(
        logits,
        output_transform,
        "energy",
        "the energy measures (that of log-probabilities is 0 for every input at T = 1, a "
        "ranking of rounding noise, and at other T no energy of the model either)",
    )
    logits = at_least_float32(logits)
    return t * torch.logsumexp(logits / t, dim=1)


@log_usage()
def negative_entropy(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Negative entropy of the softmax distribution.

    .. code-block:: text

        score = sum_c p_c log p_c,   p = softmax(z)   (0 log 0 = 0)

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [-log C, 0], higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import negative_entropy
        >>> scores = negative_entropy(model, images)
    """
    logits = at_least_float32(
        _logits(forward_func, inputs, additional_forward_args, output_transform)
    )
    check_several_classes(logits, "negative_entropy takes a softmax over the classes")
    # the top class's p log p is about -(1 - p_P): kept, where log_softmax rounds it to 0
    log_p = log_softmax_precise(logits, 1)
    return (log_p.exp() * log_p).sum(1)


@log_usage()
def margin(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Margin between the two most likely classes.

    .. code-block:: text

        score = p_(1) - p_(2),   p = softmax(z) sorted in decreasing order

    Args:
        forward_func (Callable): the model, returning (N, C >= 2) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [0, 1], higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import margin
        >>> scores = margin(model, images)
    """
    logits = at_least_float32(
        _logits(forward_func, inputs, additional_forward_args, output_transform)
    )
    check_several_classes(logits, "margin takes a softmax over the classes")
    top = torch.softmax(logits, 1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


@log_usage()
def log_likelihood(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Log-likelihood of the predicted class (minus the NLL of the prediction).

    .. code-block:: text

        score = max_c log softmax(z)_c

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores <= 0, higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import log_likelihood
        >>> scores = log_likelihood(model, images)
    """
    logits = at_least_float32(
        _logits(forward_func, inputs, additional_forward_args, output_transform)
    )
    check_several_classes(logits, "log_likelihood takes a softmax over the classes")
    # -log1p(sum of the other classes' exp(z_j - z_P)): log_softmax gives exactly 0 there
    return log_softmax_precise(logits, 1).amax(1)


@log_usage()
def odin(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    temperature: float = DEFAULT_ODIN_TEMPERATURE,
    epsilon: float = DEFAULT_ODIN_EPSILON,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""ODIN: temperature scaling and input perturbation (Liang, Li and Srikant, ICLR 2018).

    .. code-block:: text

        S_T(x)  = max_c softmax(z(x) / T)_c
        x~      = x - epsilon * sign(-grad_x log S_T(x))
        score   = S_T(x~)

    Every floating-point input tensor is perturbed (one the output does not depend on through
    autograd has a zero gradient and stays as it is). Gradients are taken for the whole batch
    at once, so examples must be independent (a model in eval mode). A model whose output
    does not depend on its inputs through autograd (``torch.no_grad()`` or ``.detach()``
    inside ``forward``) is refused (ValueError); one whose input gradient is exactly zero
    (it rounds its input) is scored by temperature scaling alone, with a warning.

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        temperature (float, optional): T > 0. Default: 100 (as in the GradTrust paper).
        epsilon (float, optional): perturbation size >= 0. Default: 0.0014.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [1/C, 1], higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import odin
        >>> scores = odin(model, images, temperature=100.0, epsilon=0.0014)
    """
    temperature = check_number(temperature, "temperature")
    epsilon = check_number(epsilon, "epsilon", allow_minimum=True)
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    model = root_module(forward_func)
    with preserved_state([model], hidden_model=model is None):

        def objective(logits: Tensor) -> Tensor:
            return torch.log_softmax(logits / temperature, 1).amax(1).sum()

        grads = input_gradients(
            forward_func,
            inputs,
            objective,
            additional_forward_args,
            output_transform,
            # before the gradients: one logit has a zero gradient, not the input's fault
            check_logits=lambda z: check_several_classes(
                z, "odin takes a softmax over the classes"
            ),
            needed_by="odin perturbs the inputs along the gradient of the model's output",
            instead=", or use a baseline that needs no input gradient (softmax_confidence, "
            "energy, ...)",
        )
        if epsilon > 0 and all(g is None or not bool(g.ne(0).any()) for g in grads):
            warnings.warn(
                "odin: the gradient of the temperature-scaled softmax with respect to the "
                "inputs is exactly zero for every example, so no input is perturbed and the "
                "scores are those of temperature scaling alone. The model's output does not "
                "change with its input to first order: a forward that rounds or quantises its "
                "input (torch.round), or a quantized model, passes no input gradient.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        perturbed = tuple(
            x.detach() - epsilon * torch.sign(-g) if g is not None else x
            for x, g in zip(inputs, grads)
        )
        with torch.no_grad():
            logits = run_forward(forward_func, perturbed, additional_forward_args, output_transform)
    check_several_classes(logits, _ODIN_SOFTMAX)
    return torch.softmax(at_least_float32(logits) / temperature, 1).amax(1)


_ODIN_SOFTMAX = "odin takes a softmax over the classes"


def _seed_from(generator: Any) -> int | None:
    generator = as_generator(generator)
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


_DROPOUT_CLASS_NAMES = frozenset(
    cls.__name__
    for cls in (
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.FeatureAlphaDropout,
    )
)


_DROPOUT_OPERATORS = tuple(
    f"aten::{name}{suffix}"
    for name in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
    for suffix in ("", "_")  # F.dropout(..., inplace=...) compiles both branches
)


def _is_dropout(module: nn.Module) -> bool:
    """A dropout layer, also compiled by ``torch.jit.script``: a torch dropout class by name
    (``original_name``), or a scripted module without submodules whose forward does nothing
    but dropout (a user's subclass of ``nn.Dropout``)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    if not isinstance(module, torch.jit.ScriptModule):
        return False
    if getattr(module, "original_name", None) in _DROPOUT_CLASS_NAMES:
        return True
    if isinstance(module, torch.jit.TracedModule) or next(module.children(), None) is not None:
        return False  # tracing fixed what dropout did; a container is not a dropout layer
    graph = getattr(module, "inlined_graph", None)
    if graph is None:
        return False
    operators = {kind for kind in _node_kinds(graph.block()) if kind.startswith("aten::")}
    # only dropout and the argument checks of F.dropout: a leaf that also computes something
    # from `training` (batch statistics) must keep its mode, as in the eager model
    return bool(operators & set(_DROPOUT_OPERATORS)) and operators <= _DROPOUT_CALL_OPERATORS


_DROPOUT_CALL_OPERATORS = frozenset(
    (*_DROPOUT_OPERATORS, "aten::lt", "aten::gt", "aten::le", "aten::ge", "aten::eq", "aten::ne")
    + ("aten::__or__", "aten::__and__", "aten::__not__", "aten::format", "aten::warn")
)


def _node_kinds(block: Any) -> Iterator[str]:
    for node in block.nodes():
        yield node.kind()
        for inner in node.blocks():
            yield from _node_kinds(inner)


@log_usage()
def mc_dropout(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    n_passes: int = DEFAULT_MC_PASSES,
    generator: torch.Generator | int | None = None,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Monte-Carlo dropout (Gal and Ghahramani, ICML 2016): negative entropy of the mean
    softmax over ``n_passes`` forward passes with dropout active.

    .. code-block:: text

        p_bar = (1/T) sum_t softmax(z_t),   z_t = logits with dropout masks t
        score = sum_c p_bar_c log p_bar_c

    Only the dropout modules (subclasses of ``nn.modules.dropout._DropoutNd``, or their
    ``torch.jit.script`` compilations; a traced model, whose dropout tracing fixed, is
    refused) are switched to train mode; batch norm and everything else keep their mode,
    and all flags are restored.
    Reproducibility: with a ``generator`` (or an int seed), a seed ``s`` is drawn as
    ``torch.randint(0, 2**62, (), generator=generator)`` and the passes run inside
    ``torch.random.fork_rng`` with torch's RNG (CPU and the inputs' CUDA device) seeded with
    ``s``, so the global RNG state is left untouched. With ``generator=None`` the global RNG is
    used (and advanced). The model's dropout layers draw their masks for the whole batch at
    once, so with a fixed seed an example's score still depends on the other examples of the
    call and their order (the dropout masks it gets are a different part of the draws);
    call it one example at a time where a score must be a property of the example alone.

    Args:
        forward_func (Callable): the model (an ``nn.Module`` or a bound method of one) with at
            least one dropout module.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        n_passes (int, optional): T >= 1. Default: 20.
        generator (torch.Generator or int, optional): source of the dropout randomness.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores in [-log C, 0], higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import mc_dropout
        >>> scores = mc_dropout(model, images, n_passes=20, generator=0)
    """
    n_passes = check_int(n_passes, "n_passes")
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    model = root_module(forward_func)
    if model is None:
        raise TypeError(
            "mc_dropout needs forward_func to be an nn.Module (or a bound method of one) to "
            "find its dropout modules."
        )
    dropouts = [m for m in model.modules() if _is_dropout(m)]
    if any(isinstance(m, torch.jit.TracedModule) for m in dropouts):
        raise ValueError(
            "`forward_func` is a traced TorchScript model: tracing fixed its dropout as it was "
            "when traced, so MC-dropout cannot switch it on; pass the eager model or a "
            "torch.jit.script one."
        )
    if not dropouts:
        raise ValueError(
            f"{type(model).__name__} has no dropout module, so MC-dropout would equal "
            "negative_entropy; use that instead."
        )
    seed = _seed_from(generator)
    device = inputs[0].device
    cuda = [device] if device.type == "cuda" else []
    with preserved_state([model], hidden_model=model is None), torch.no_grad():
        for module in dropouts:
            module.training = True
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
                if cuda:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
            mean = complement = None
            for _ in range(n_passes):
                logits = run_forward(
                    forward_func, inputs, additional_forward_args, output_transform
                )
                check_several_classes(logits, "mc_dropout takes a softmax over the classes")
                work = at_least_float32(logits)
                probs, rest = torch.softmax(work, 1), softmax_complement(work, 1)
                mean = probs if mean is None else mean + probs
                complement = rest if complement is None else complement + rest
    mean, complement = mean / n_passes, complement / n_passes
    # the top class's p_bar rounds to 1 on confident predictions and its term,
    # p log p = -(1 - p) + ..., to 0: it is formed from the mean complement 1 - p_bar instead
    top = mean.argmax(dim=1, keepdim=True)
    rest_of_top = complement.gather(1, top)
    top_term = (1 - rest_of_top) * torch.log1p(-rest_of_top)
    return torch.special.xlogy(mean, mean).scatter(1, top, top_term).sum(1)


# ---------------------------------------------------------------------------------------------
# gradient-based baselines


def _row_norms(values: Tensor, p: float) -> Tensor:
    """The p-norm of each row, by ``max |v| * ||v / max |v|||``: ``vector_norm`` itself
    squares the entries, which overflows float32 for features above about 1.8e19 (inf
    where the norm is a finite float32 number)."""
    scale = values.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale[:, 0] * torch.linalg.vector_norm(values / scale, p, dim=1)


@log_usage()
def gradnorm(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    layer: nn.Module | str | None = None,
    p: float = 2.0,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""GradNorm (Huang, Geng and Li, NeurIPS 2021): norm of the last-layer weight gradient of
    the KL divergence from the uniform distribution to the softmax.

    .. code-block:: text

        L     = KL(u || softmax(z)),   u = (1/C, ..., 1/C),   dL/dz = softmax(z) - u
        score = ||grad_W L||_p = ||softmax(z) - u||_p ||h||_p     (entry-wise p-norm of g h^T)

    The score is the norm itself, as in the GradNorm paper: a peaked softmax and large
    features give large gradients, and these are the trusted (in-distribution) predictions,
    so higher = more trusted. The GradNorm paper uses p = 1; the default here is the L2 norm.
    The GradTrust paper's GradNorm baseline (and its authors' ``demo.py``) is *minus* this
    norm: its ranking is the reverse of this one (misprediction AUROC ``1 - a``, and AUAC
    from the other end), so pass ``-gradnorm(...)`` to compare with that paper's table.
    Closed form (one forward pass) when ``layer`` is the final ``nn.Linear``; otherwise the
    per-example weight gradients are computed with torch.func.

    Args:
        forward_func (Callable): the model, returning (N, C) logits.
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        layer (nn.Module or str, optional): default the last ``nn.Linear`` (must produce the
            logits).
        p (float, optional): the entry-wise norm, >= 1. Default: 2.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores >= 0, higher = more trusted.

    Examples::

        >>> from captum_ext.metrics import gradnorm
        >>> scores = gradnorm(model, images)
    """
    p = check_number(p, "p", minimum=1.0, allow_minimum=True)
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    extra = format_additional_forward_args(additional_forward_args)
    head, automatic = _resolve_head(forward_func, layer, inputs, extra, output_transform)
    model = root_module(forward_func)
    with preserved_state([model, head], hidden_model=model is None):
        logits, calls = _forward_recording(forward_func, inputs, extra, head, output_transform)
        check_several_classes(
            logits,
            "gradnorm takes the gradient of KL(uniform || softmax) over the classes",
            why="the softmax of one output is always 1, so every gradient is 0 and every "
            "score would be 0",
        )
        g = torch.softmax(logits, 1) - 1.0 / logits.shape[1]
        h = _head_features(head, logits, calls)
        if h is not None:
            g, h = at_least_float32(g), at_least_float32(h)
            return _row_norms(g, p) * _row_norms(h, p)
        if automatic:
            raise ValueError(
                "`layer` is None and the last nn.Linear does not produce the logits; pass `layer`."
            )
        weight = _weight_of(head)
        seen = logits_seen_per_example(forward_func, inputs, extra, logits, output_transform)
        g = torch.softmax(seen, 1) - 1.0 / seen.shape[1]

        def reduce(grads: dict[str, Tensor]) -> Tensor:
            (grad,) = grads.values()
            return _row_norms(at_least_float32(grad.flatten(1)), p)

        return per_example_parameter_gradients(
            forward_func,
            inputs,
            extra,
            {"m": head},
            {"m.weight": weight},
            g.unsqueeze(1),
            reduce,
            output_transform,
        )


def _parameter_holders(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that hold parameters of their own (a parametrised layer with
    the originals of its parametrisations, which are not counted apart), by name, in
    declaration order."""
    inside = {
        id(part)
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for part in module.parametrizations.modules()
    }
    holders = {
        name: module
        for name, module in model.named_modules()
        if id(module) not in inside and owned_parameters(module)
    }
    if not holders:
        raise ValueError(f"{type(model).__name__} has no parameters; purview needs some.")
    return holders


def _default_groups(
    model: nn.Module, holders: dict[str, nn.Module], ranks: dict[str, int]
) -> list[list[str]]:
    """purview's "early" and "late" groups: the parameters (by name) of the first and of
    the last of ``holders`` to run (``ranks`` of
    :func:`~captum_ext._utils.layers.execution_ranks`: a module with children, the model
    itself included, by the first use of its own parameters, so a vision transformer's
    class token comes after its ``conv_proj``); by declaration order where the forward pass
    could not be watched (a TorchScript model or layer, or none ran)."""
    names = list(holders)
    scripted = any(isinstance(module, torch.jit.ScriptModule) for module in holders.values())
    ran = [name for name in names if name in ranks]
    if ran and not scripted:
        names = sorted(ran, key=lambda name: ranks[name])
    by_id = {id(t): name for name, t in model.named_parameters()}
    return [
        [by_id[id(t)] for t in owned_parameters(holders[name]) if id(t) in by_id]
        for name in (names[0], names[-1])
    ]


def _group_parameters(model: nn.Module, groups: Any) -> list[list[str]]:
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError(
            "`groups` must be a non-empty list of groups, each a module, a dotted module name "
            "or a list of those."
        )
    names = {id(t): name for name, t in model.named_parameters()}
    result = []
    for i, group in enumerate(groups):
        members = group if isinstance(group, (list, tuple)) else [group]
        params: list[str] = []
        for member in members:
            module = resolve_layer(model, member, argument=f"groups[{i}]")
            for t in module.parameters():
                if id(t) not in names:
                    raise ValueError(f"`groups[{i}]` holds parameters outside the model.")
                if names[id(t)] not in params:
                    params.append(names[id(t)])
        if not params:
            raise ValueError(f"`groups[{i}]` has no parameters.")
        result.append(params)
    return result


@log_usage()
def purview(
    forward_func: Callable,
    inputs: Tensor | tuple[Tensor, ...],
    *,
    groups: Sequence[Any] | None = None,
    additional_forward_args: Any = None,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    r"""Purview (Lee and AlRegib, 2023): minus the mean squared gradient norm of parameter
    groups under binary cross-entropy against an all-ones label.

    .. code-block:: text

        L     = mean_c BCEWithLogits(z_c, 1) = mean_c log(1 + exp(-z_c))
        score = - (1/G) sum_groups sum_{theta in group} ||dL/dtheta||^2

    Gradients are per example (torch.func ``functional_call`` + ``vjp`` under ``vmap``).
    Large gradients mean the model would have to change to fit the input: less trusted.
    For a last linear layer the gradient is ``g h^T``, so the score follows the feature norm
    ``||h||^2``. Where correct predictions have the larger features, as on the bundled digit
    model, it ranks them *below* errors (AUROC 0.42; ``benchmarks/gradtrust_evidence.py``).

    Args:
        forward_func (Callable): the model (an ``nn.Module`` or a bound method of one).
        inputs (Tensor or tuple of Tensor): the examples, batch first.
        groups (list, optional): parameter groups, each a module, a dotted module name or a
            list of those (all their parameters, biases included). Default: the "early" and
            "late" groups, the parameters of their own of the first and of the last module
            holding parameters to run in the forward pass on ``inputs`` (watched with hooks:
            a layer runs where it is called; a module with children, the model itself
            included, where its own parameters are first used, so that a vision
            transformer's class token, which joins after the patch embedding, is not the
            early group; a module whose parameters another uses without calling it by
            their first use; a module that does not run is never picked); in declaration
            order for a TorchScript model, whose compiled code cannot be watched.
        additional_forward_args (Any, optional): extra arguments for ``forward_func``.
        output_transform (Callable, optional): maps the model's output to (N, C) logits.

    Returns:
        Tensor: (N,) scores <= 0, higher = more trusted.

    Raises:
        ValueError: the model's outputs are not its logits but probabilities or
            log-probabilities (every row's log-sum-exp is 0, a final ``softmax`` /
            ``log_softmax``), or ``output_transform`` is
            :func:`~captum_ext.data.log_probabilities`: the sigmoid of each output is not
            invariant to the constant per row that those lose. Score such a model without
            its final softmax.

    Examples::

        >>> from captum_ext.metrics import purview
        >>> scores = purview(model, images, groups=["features.0", "classifier"])
    """
    output_transform = _check_transform(output_transform)
    inputs = format_inputs(inputs)
    extra = format_additional_forward_args(additional_forward_args)
    model = root_module(forward_func)
    if model is None:
        raise TypeError("purview needs forward_func to be an nn.Module or a bound method of one.")
    if groups is None:  # the first and the last to run, watched in the forward pass below
        holders = _parameter_holders(model)
        watched = execution_ranks(holders)
    else:
        group_names = _group_parameters(model, groups)
        watched = contextlib.nullcontext({})
    with preserved_state([model], hidden_model=model is None):
        with watched as ranks:
            logits = _logits(forward_func, inputs, extra, output_transform)
        if groups is None:
            group_names = _default_groups(model, holders, ranks)
        named = dict(model.named_parameters())
        wanted = {f"m.{name}": named[name] for group in group_names for name in group}
        _check_real_logits(
            logits,
            output_transform,
            "purview",
            "purview's loss takes the sigmoid of each output, which that constant changes",
        )
        logits = logits_seen_per_example(forward_func, inputs, extra, logits, output_transform)
        cotangent = (torch.sigmoid(logits) - 1) / logits.shape[1]

        def reduce(grads: dict[str, Tensor]) -> Tensor:
            per_group = [
                sum(at_least_float32(grads[f"m.{name}"].flatten(1)).pow(2).sum(1) for name in group)
                for group in group_names
            ]
            return -torch.stack(per_group).mean(0)

        return per_example_parameter_gradients(
            forward_func,
            inputs,
            extra,
            {"m": model},
            wanted,
            cotangent.unsqueeze(1),
            reduce,
            output_transform,
        )
