r"""Build the ``captum-ext report`` page from a :class:`ReportConfig`: the library side of the
command line.

- :class:`ReportConfig`: everything ``captum-ext report`` takes (model spec and weights,
  images folder, layer, sections, limit, out, device, classes file, transform, ...).
- :class:`SectionInputs`: what every section needs, built ONCE per report (model, layer,
  images, display images, labels, class names, device, the predictions and probabilities).
- :data:`SECTION_REGISTRY`: section name -> :class:`SectionSpec` (description, the function
  that builds it from a :class:`SectionInputs`, its options from the config). Adding a
  section to the report is one entry.
- :func:`build_report`: resolve the inputs (:func:`captum_ext.data.loading.resolve_inputs`),
  build the sections in order, time each, write the page; returns a ``ReportResult``.

Errors are one-line exceptions naming the command-line option (``--out``, ``--layer``, ...):
``OutputError`` (``--out`` cannot be written), ``SectionTooBigError`` (a section asked for
by name does not fit in memory), and ``ValueError`` / ``TypeError`` / ``OSError``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from captum_ext._utils.summaries import format_seconds
from captum_ext.viz.evaluation import EVALUATION_IMAGES

__all__ = [
    "OutputError",
    "ReportConfig",
    "ReportResult",
    "SECTION_REGISTRY",
    "SectionInputs",
    "SectionSpec",
    "SectionTooBigError",
    "USER_MODEL_SECTIONS",
    "build_report",
    "format_timings",
]

#: the training batch of the inversion generator for a model of your own
INVERSION_BATCH = 64


class OutputError(Exception):
    """The output location (``--out``) cannot be written."""


class SectionTooBigError(Exception):
    """A section asked for by name needs more memory than is free."""


# --------------------------------------------------------------------------------------
# output checks (shared with ``captum-ext score``)


def _describe_os_error(error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason}: {error.filename!r}" if error.filename else reason


def check_output(out: Path, *, folder: bool) -> None:
    """Fail early, before any work, when ``--out`` cannot be written: a scratch file must be
    creatable in the ``--out`` folder (or the folder the ``--out`` file goes in), or, when
    that does not exist yet, in its nearest existing parent (nothing is created there), and
    its disk must not be full. The temporary files of an earlier run that was killed while
    writing are removed."""
    from captum_ext._utils.training import _remove_stale_temporaries, check_writable

    try:
        check_writable(out, folder=folder)
        if folder and out.is_dir():
            _remove_stale_temporaries(out / "index.html")
    except OSError as error:
        raise OutputError(
            f"`--out` {str(out)!r} cannot be written ({_describe_os_error(error)})."
        ) from error


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _is_under(name: Any, out: Path) -> bool:
    try:
        return Path(os.fsdecode(name)).resolve().is_relative_to(out.resolve())
    except (TypeError, ValueError, OSError):
        return False


@contextmanager
def writing_to(out: Path) -> Iterator[None]:
    """A failure to write (full disk, folder made read-only meanwhile) names ``--out``; other
    OS errors (e.g. a missing input file) pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS and not (
            error.filename is not None and _is_under(error.filename, out)
        ):
            raise
        raise OutputError(
            f"writing to `--out` {str(out)!r} failed ({_describe_os_error(error)})."
        ) from error


# --------------------------------------------------------------------------------------
# GradTrust on TorchScript models (shared with ``captum-ext score``)

GRADTRUST_SCORES = ("gradtrust", "gradtrust_reference")
#: the scores that read the final linear layer with a hook (a TorchScript model needs the
#: wrapper of :func:`gradtrust_model` for them)
FINAL_LAYER_SCORES = (*GRADTRUST_SCORES, "gradnorm")


def name_the_option(error: Exception) -> Exception:
    """GradTrust's advice to "pass `layer`" becomes advice to pass ``--final-layer``."""
    text = str(error)
    if "pass `layer`" not in text:
        return error
    return type(error)(text.replace("pass `layer`", "pass `--final-layer`"))


def gradtrust_model(model: Any, final_layer: str | None, example: Any, layer: str | None = None):
    """For a TorchScript model: a wrapper whose final linear layer GradTrust can read
    (:func:`captum_ext.torchscript.expose_final_layer`), also exposing ``layer``; for the
    module of a ``torch.export`` program, the same from :mod:`captum_ext.exported`. Eager
    models are returned unchanged (``--final-layer`` goes to GradTrust's ``layer``)."""
    import torch

    from captum_ext.exported import (
        expose_exported_final_layer,
        expose_exported_layer,
        is_exported,
    )
    from captum_ext.torchscript import expose_final_layer

    if is_exported(model):
        if layer is None:
            return expose_exported_final_layer(model, example, final_layer=final_layer)
        return expose_exported_layer(model, layer, example, final_layer=final_layer)[0]
    if not isinstance(model, torch.jit.ScriptModule):
        return model
    return expose_final_layer(model, final_layer, layer=layer, example=example)


def compiled_model(model: Any) -> bool:
    """A TorchScript model or the module of a ``torch.export`` program: its layers are reached
    through a wrapper (:func:`~captum_ext.data.expose_layer`), which is what gets adapted to
    logits, and ``--final-layer`` names no hookable module."""
    import torch

    from captum_ext.exported import is_exported

    return isinstance(model, torch.jit.ScriptModule) or is_exported(model)


#: what the report prints when :func:`~captum_ext.data.with_logits_output` adapts the model
ADAPTATION_MESSAGES = {
    "field": "The model returns its logits in a `logits` field (as Hugging Face's models do): "
    "they are explained.",
    "one logit": "The model returns one logit z per image (a binary classifier): it is read "
    "as the two-class logits [-z/2, z/2], class 0 the negative, class 1 the positive.",
    "probabilities": "The model returns probabilities (it ends in a softmax): they are read "
    "as log-probabilities, which are logits (softmax(log p) = p).",
}


def gradtrust_kwargs(
    model: Any, final_layer: str | None, *, reads: str | None = None
) -> dict[str, dict[str, Any]]:
    """``score_kwargs`` passing ``--final-layer`` to both GradTrust scores and to gradnorm
    (eager models: the layer whose weight gradient each of them takes).

    A model whose output is transformed into logits (:class:`~captum_ext.data.LogitsOutput`
    reading one logit or probabilities; ``reads`` when the wrapper is not ``model`` itself,
    as for a TorchScript model) takes its gradients by autograd: its last linear layer does
    not give those logits, so GradTrust's closed form does not apply."""

    options: dict[str, Any] = {}
    if (reads or getattr(model, "reads", "field")) != "field":
        options["method"] = "autograd"
    if final_layer is not None and not compiled_model(model):
        from captum_ext._utils.layers import resolve_layer

        resolve_layer(model, final_layer, argument="--final-layer")  # named as the option
        options["layer"] = final_layer
    kwargs = {name: dict(options) for name in GRADTRUST_SCORES} if options else {}
    if "layer" in options:
        kwargs["gradnorm"] = {"layer": options["layer"]}
    return kwargs


# --------------------------------------------------------------------------------------
# configuration, inputs, registry


@dataclasses.dataclass
class ReportConfig:
    """Everything ``captum-ext report`` takes; the defaults are the command line's.

    ``model=None`` is the bundled digit classifier on its sample digits (``images=None``).
    ``sections=None`` is every registered section for the bundled model and
    ``USER_MODEL_SECTIONS`` (``contrastive``, ``voice``, ``metrics``, ``trust``) for a model
    of your own.
    """

    model: str | None = None
    weights: str | None = None
    layer: str | None = None
    images: str | None = None
    transform: str | None = None
    classes: str | None = None
    out: str | os.PathLike = "report"
    batch_size: int = 64
    device: Any = "cpu"
    limit: int | None = None
    sections: Sequence[str] | None = None
    mask_net: str | None = None
    introspection_head: str | None = None
    mask_layers: str | None = None
    inversion_steps: int = 300
    inversion_classes: int = 20
    voice_contrasts: str | int = "all"
    metrics_steps: int = 20
    final_layer: str | None = None
    least_trusted: int = 10
    title: str | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class SectionInputs:
    """What every report section needs, built once per report by :func:`build_report`.

    Attributes:
        model: the loaded model (eager or TorchScript).
        forward: what the sections call (``model``, or a wrapper exposing ``layer`` inside a
            TorchScript model).
        layer: the layer to explain (a module of ``forward``); ``layer_name`` its name.
        images (Tensor): ``N x C x H x W`` preprocessed images.
        display_images (numpy.ndarray): the same in [0, 1], ``N x H x W x C``.
        labels (list or None): true class per image, None where unknown (None: none known).
        names (list[str]): a name per image.
        class_names (list[str] or None): one per model output.
        transform (str or Callable): the preprocessing of ``images``.
        device (torch.device): where the model runs.
        out (Path): the report folder.
        batch_size (int): images per forward / attribution call.
        progress (bool): progress bars on stderr.
        probabilities (Tensor): ``N x C`` softmax of the model's outputs, computed once.
        predictions (Tensor): ``N`` predicted classes (argmax of ``probabilities``).
        problems (Mapping[str, Exception]): section name -> why it cannot be built for this
            model (found while loading; raised by that section's build).
    """

    model: Any
    forward: Any
    layer: Any
    layer_name: str
    images: Any
    display_images: Any
    labels: list[int | None] | None
    names: list[str]
    class_names: list[str] | None
    transform: Any
    device: Any
    out: Path
    batch_size: int
    progress: bool
    probabilities: Any
    predictions: Any
    problems: Mapping[str, Exception] = dataclasses.field(default_factory=dict)

    def common(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments every ``*_section`` function takes."""
        arguments = (
            self.forward,
            self.layer,
            self.images,
            self.display_images,
            self.class_names,
            self.out,
        )
        options = {
            "labels": self.labels,
            "names": self.names,
            "batch_size": self.batch_size,
            "progress": self.progress,
        }
        return arguments, options


#: what a section's ``build`` returns: the section, or a one-line reason it was left out
SectionBuilder = Callable[[SectionInputs, ReportConfig, bool], Any]


@dataclasses.dataclass(frozen=True)
class SectionSpec:
    """One entry of :data:`SECTION_REGISTRY`.

    Attributes:
        description (str): one line for ``--help`` and the docs.
        build (Callable): ``build(inputs, config, asked) -> Section | str``: the section, or
            a one-line reason it is left out (only when ``asked`` is False: a section asked
            for by name raises instead).
        options (Mapping[str, str]): keyword argument of the section function -> the
            :class:`ReportConfig` field it comes from (its default).
        in_defaults (bool): whether the bundled default report builds it (False: only when
            asked for with ``--sections``).
    """

    description: str
    build: SectionBuilder
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    in_defaults: bool = True

    def kwargs(self, config: ReportConfig) -> dict[str, Any]:
        return {name: getattr(config, field) for name, field in self.options.items()}


def _build_contrastive(inputs: SectionInputs, config: ReportConfig, asked: bool):
    from captum_ext.viz import contrastive_section

    arguments, options = inputs.common()
    return contrastive_section(*arguments, **options)


def _build_voice(inputs: SectionInputs, config: ReportConfig, asked: bool):
    from captum_ext.viz import voice_section

    arguments, options = inputs.common()
    return voice_section(*arguments, **options, **SECTION_REGISTRY["voice"].kwargs(config))


def _build_metrics(inputs: SectionInputs, config: ReportConfig, asked: bool):
    from captum_ext.viz import explanation_metrics_section

    arguments, options = inputs.common()
    extra = SECTION_REGISTRY["metrics"].kwargs(config)
    return explanation_metrics_section(*arguments, **options, **extra)


def _build_evaluation(inputs: SectionInputs, config: ReportConfig, asked: bool):
    from captum_ext.viz.evaluation import evaluation_section

    arguments, options = inputs.common()
    return evaluation_section(*arguments, **options)


def _build_trust(inputs: SectionInputs, config: ReportConfig, asked: bool):
    from captum_ext.viz import trust_section

    problem = inputs.problems.get("trust")
    try:
        if problem is not None:
            raise problem
        arguments, options = inputs.common()
        return trust_section(
            *arguments,
            **options,
            **SECTION_REGISTRY["trust"].kwargs(config),
            score_kwargs=gradtrust_kwargs(
                inputs.model, config.final_layer, reads=getattr(inputs.forward, "reads", None)
            ),
        )
    except (ValueError, TypeError) as error:
        error = name_the_option(error)
        if asked:
            raise error from None
        # asked for by default only: a model GradTrust cannot read (e.g. TorchScript, whose
        # final nn.Linear is compiled) still gets the other sections
        return f"trust section left out: {str(error).strip().splitlines()[0]}"


def _build_masks(inputs: SectionInputs, config: ReportConfig, asked: bool):
    """The bundled mask net, or ``--mask-net`` for your own model."""
    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.viz import minimal_mask_section

    if config.mask_net is None:
        if config.model is not None:
            raise _missing_section_file("masks")
        from captum_ext.bundled import load_bundled_mask_explainer

        explainer = load_bundled_mask_explainer(inputs.model)
    else:
        if config.mask_layers and compiled_model(inputs.model):
            raise ValueError(
                "`--mask-layers` with a TorchScript or torch.export model: its layers take no "
                "hooks (compiled, or graph operators), so the masks can match the activations "
                "of the explained layer (--layer) only; leave --mask-layers out, or give "
                "--model as 'package.module:factory' with --weights."
            )
        if config.mask_layers:
            layers = [name.strip() for name in config.mask_layers.split(",")]
            if inputs.layer_name == "grid":  # names inside the wrapper
                layers = [f"model.{name}" for name in layers]
        else:  # the explained layer itself (a TorchScript model's tap, a transformer's grid)
            layers = [inputs.layer]
        try:
            explainer = ActivationMatchingMask(inputs.forward, layers)
        except (ValueError, TypeError) as error:
            if not config.mask_layers:  # about the explained layer (--layer): as they are
                raise
            # the names are the command's --mask-layers, not the method's `layers`
            raise type(error)(str(error).replace("`layers`", "`--mask-layers`")) from None
        with _named_file_errors("--mask-net"):
            explainer.load(config.mask_net)
    return minimal_mask_section(
        inputs.forward,
        inputs.images,
        inputs.display_images,
        inputs.class_names,
        inputs.out,
        progress=inputs.progress,
        explainer=explainer,
        labels=inputs.labels,
        names=inputs.names,
        batch_size=inputs.batch_size,
    )


def _format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # pragma: no cover


def _inversion_too_big(config: ReportConfig, inputs: SectionInputs) -> tuple[str | None, Any]:
    """``(reason, cost)``: one line saying why the inversion generator cannot be trained for
    the model (a TorchScript model, or one whose training would not fit in the memory that
    is free), or None when it fits (or the free memory is unknown); and the estimate of its
    training (:func:`captum_ext.inversion.estimate_inversion_cost`, None for TorchScript)."""
    import torch

    from captum_ext import inversion as inv

    if isinstance(inputs.model, torch.jit.ScriptModule):
        return (
            "the inversion section needs an eager model (it reads layers with hooks, which a "
            "TorchScript model does not take); give --model as 'package.module:factory' "
            "with --weights"
        ), None
    cost = inv.estimate_inversion_cost(
        inputs.model,
        tuple(inputs.images.shape[1:]),
        batch_size=INVERSION_BATCH,
        steps=config.inversion_steps,
    )
    available = inv.available_memory_bytes(inputs.device)
    if available is None or cost.fits(available):
        return None, cost
    return (
        f"the inversion section needs {cost.describe()}, more than the "
        f"{_format_bytes(available)} free on {inputs.device} (with a 1.5x margin)"
    ), cost


def _announce_inversion(cost: Any, device: Any) -> None:
    """Say on stderr, before the generator's training starts (also with --no-progress), what
    it is estimated to take (:meth:`~captum_ext.inversion.InversionCost.describe`)."""
    print(
        f"captum-ext report: training the inversion generator on {device}: estimated "
        f"{cost.describe()} (fewer --inversion-steps for a shorter run)",
        file=sys.stderr,
        flush=True,
    )


def _pixel_maps(transform: Any) -> tuple[Any, tuple[float, float], Any]:
    """(preprocess, value_range, denormalize) of the inversion generator for a transform name:
    ``preprocess`` takes the generator's pixels in ``value_range`` to the model's inputs,
    ``denormalize`` takes those back to [0, 1] for display."""
    import torch

    from captum_ext.data import IMAGENET_MEAN, IMAGENET_STD, denormalize_digits, normalize_digits

    if transform == "digits":  # normalize_digits reads pixels on the 0..255 scale
        return normalize_digits, (0.0, 255.0), denormalize_digits
    if transform == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).reshape(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD).reshape(1, -1, 1, 1)

        def denormalize(x):
            return x * std.to(x.device) + mean.to(x.device)

        return (IMAGENET_MEAN, IMAGENET_STD), (0.0, 1.0), denormalize
    return None, (0.0, 1.0), None


def _build_introspection(inputs: SectionInputs, config: ReportConfig, asked: bool):
    """The bundled introspective head, or ``--introspection-head`` for your own model."""
    from captum_ext.introspection import IntrospectiveNetwork
    from captum_ext.viz.introspection import introspection_section

    if config.introspection_head is None:
        if config.model is not None:
            raise _missing_section_file("introspection")
        from captum_ext.bundled import load_bundled_introspective_network

        network = load_bundled_introspective_network(inputs.model)
    else:
        # a TorchScript model: the wrapper running an eager copy of its final linear layer,
        # which the introspective features read (as GradTrust does)
        model = gradtrust_model(
            inputs.model, config.final_layer, inputs.images[:2].to(inputs.device)
        )
        with _named_file_errors("--introspection-head"):
            network = IntrospectiveNetwork.load(config.introspection_head, model)
    return introspection_section(
        network,
        inputs.images,
        inputs.display_images,
        inputs.class_names,
        inputs.out,
        labels=inputs.labels,
        names=inputs.names,
        batch_size=inputs.batch_size,
        progress=inputs.progress,
    )


def _build_inversion(inputs: SectionInputs, config: ReportConfig, asked: bool):
    """The bundled generator, or one trained for ``--inversion-steps``."""
    from captum_ext.inversion import NetworkInversion
    from captum_ext.viz import inversion_section

    preprocess, value_range, denormalize = _pixel_maps(inputs.transform)
    if config.model is None:
        from captum_ext.bundled import load_bundled_inversion

        inversion = load_bundled_inversion(inputs.model)
    else:
        reason, cost = _inversion_too_big(config, inputs)
        if reason is not None:
            if asked:  # asked for by name: say why it cannot be done
                raise SectionTooBigError(reason)
            return f"inversion section left out: {reason}"
        _announce_inversion(cost, inputs.device)
        inversion = NetworkInversion(
            inputs.model,
            input_shape=tuple(inputs.images.shape[1:]),
            preprocess=preprocess,
            value_range=value_range,
            batch_size=INVERSION_BATCH,
            seed=0,
        )
        started = time.perf_counter()
        inversion.fit(config.inversion_steps, progress=inputs.progress)
        took = time.perf_counter() - started
    section = inversion_section(
        inversion,
        inputs.out,
        class_names=inputs.class_names,
        denormalize=denormalize,
        **SECTION_REGISTRY["inversion"].kwargs(config),
    )
    if config.model is not None:  # the generator was trained here: what it cost
        section.intro += (
            f"\nThe generator was trained here on {inputs.device}: estimated beforehand "
            f"{cost.describe()}; it took {format_seconds(took)}."
        )
    return section


#: the sections of ``captum-ext report`` in their default order: the one list the help text,
#: the errors and the documentation are built from. Adding a section is one entry.
SECTION_REGISTRY: dict[str, SectionSpec] = {
    "contrastive": SectionSpec(
        "Grad-CAM ('Why P?'), ContrastCAM ('Why P, rather than Q?'), "
        "CounterfactualCAM ('What if not P?') and Finer-CAM ('What sets P apart from its "
        "look-alikes?') maps",
        _build_contrastive,
    ),
    "voice": SectionSpec(
        "the VOICE uncertainty of the Grad-CAM explanation",
        _build_voice,
        {"contrasts": "voice_contrasts"},
    ),
    "metrics": SectionSpec(
        "deletion and insertion AUCs of the three maps",
        _build_metrics,
        {"n_steps": "metrics_steps"},
    ),
    "trust": SectionSpec(
        "which predictions can be trusted: GradTrust vs the trust baselines, accuracy "
        "retention, the least-trusted images",
        _build_trust,
        {"least_trusted": "least_trusted"},
    ),
    "masks": SectionSpec(
        "minimal activation-matching masks and the circuits of x and m * x (your own "
        "model needs --mask-net)",
        _build_masks,
    ),
    "inversion": SectionSpec(
        "what the model thinks each class looks like (network inversion; trained for "
        "--inversion-steps on your own model, skipped when it would not fit in memory)",
        _build_inversion,
        {"max_classes": "inversion_classes"},
    ),
    "introspection": SectionSpec(
        "feed-forward vs introspective predictions, the images where they disagree first "
        "(your own model needs --introspection-head; asked for by name)",
        _build_introspection,
        in_defaults=False,
    ),
    "evaluation": SectionSpec(
        "every method (Saliency, IG, Guided Backprop, GradCAM, ContrastCAM, FinerCAM, "
        "LayerIBA, PathwayGradient) scored by "
        "deletion, insertion, ROAD, completeness and the sanity checks on the first "
        f"{EVALUATION_IMAGES} images only (tens of seconds per image at 224 x 224 on a CPU; "
        "--batch-size also bounds its batches; asked for by name)",
        _build_evaluation,
        in_defaults=False,
    ),
}
#: the default sections for a model of your own (masks need --mask-net, inversion trains)
USER_MODEL_SECTIONS: tuple[str, ...] = ("contrastive", "voice", "metrics", "trust")


def default_sections(config: ReportConfig) -> list[str]:
    """The sections built when ``config.sections`` is None."""
    if config.model is not None:
        return list(USER_MODEL_SECTIONS)
    return [name for name, spec in SECTION_REGISTRY.items() if spec.in_defaults]


# --------------------------------------------------------------------------------------
# build_report


def _conv_layer_names(model: Any) -> list[str]:
    from captum_ext.exported import exported_conv_layers, is_exported

    if is_exported(model):  # its layers are gone as modules: read the graph's module paths
        return exported_conv_layers(model)
    names = []
    for name, module in model.named_modules():
        kind = getattr(module, "original_name", type(module).__name__)
        if name and "Conv" in kind:
            names.append(name)
    return names


def _token_grid(forward: Any, layer: Any, layer_name: str, example: Any):
    """A :class:`~captum_ext.token_grid.TokenGridModel` when ``layer`` outputs tokens
    ``(N, tokens, D)`` (a vision transformer's block) or a channels-last ``(N, h, w, C)``
    grid (a Swin stage), else None. ``ValueError`` naming ``--layer`` when the tokens do not
    form a grid of patches that tiles the example's height and width after 0-2 leading
    tokens."""
    import torch

    from captum_ext.token_grid import (
        expose_token_grid,
        layer_output_shape,
        looks_channels_last,
    )

    if not isinstance(forward, torch.nn.Module) or isinstance(forward, torch.jit.ScriptModule):
        return None
    shape = layer_output_shape(forward, layer, example)
    channels_last = len(shape) == 4 and looks_channels_last(shape, tuple(example.shape[-2:]))
    if not channels_last and len(shape) != 3:
        return None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the patch tokens of `layer` do not reach")
            wrapped = expose_token_grid(forward, layer, example)
    except ValueError as error:
        raise ValueError(
            f"`--layer` {layer_name!r} outputs {shape}, which cannot be shown as a map: {error} "
            "Explain it from Python with captum_ext.token_grid.expose_token_grid(..., "
            "grid_size=(h, w), leading=k)."
        ) from error
    if wrapped.reaches_output is False:  # checked by expose_token_grid on the same example
        raise ValueError(
            f"`--layer` {layer_name!r}: its patch tokens do not reach the model's output (their "
            "gradients are exactly zero), so every map would be blank. After a vision "
            "transformer's last block only the class token is read; give the block's first "
            "norm, e.g. `encoder.layers.encoder_layer_<last>.ln_1` (torchvision) or "
            "`blocks.<last>.norm1` (timm), or leave `--layer` out for a torchvision ViT. A "
            "freshly built torchvision ViT (no `--weights`) has an all-zero head, so no layer "
            "reaches its output."
        )
    return wrapped


def pick_layer(model: Any, layer: str | None) -> str:
    """``layer``, or the last convolutional block of a known torchvision model (said on
    stdout); otherwise a ``ValueError`` naming ``--layer`` and the last convolutions."""
    from captum_ext._utils.layers import uncompiled
    from captum_ext.data.loading import _PRE_NORMS, _model_class_name, default_cam_layer

    if layer is not None:
        if not layer.strip():
            raise ValueError("`--layer` is empty; give a dotted layer name or leave it out.")
        return layer
    model = uncompiled(model)  # torch.compile's wrapper: its module's class and names
    picked = default_cam_layer(model)
    kind = _model_class_name(model)
    if picked is None:
        candidates = _conv_layer_names(model)[-3:]
        hint = f" (the last convolutions are {', '.join(candidates)})" if candidates else ""
        from captum_ext.exported import is_exported

        names = (
            "the names of the model it was exported from"
            if is_exported(model)
            else "from model.named_modules()"
        )
        raise ValueError(
            f"`--layer` is required for a {kind} model{hint}; give the dotted name of the "
            f"layer to explain, {names}."
        )
    what = {
        "SwinTransformer": "stage (after its norm)",
        "VisionTransformer": "block's first norm",
    }.get(kind, "convolutional block")
    if picked.rsplit(".", 1)[-1] in _PRE_NORMS:
        what = "transformer block's first norm"
    print(f"Explaining layer {picked!r}, the last {what} of {kind} (--layer to change).")
    return picked


def _check_sections(sections: Sequence[str]) -> list[str]:
    if isinstance(sections, str):
        sections = sections.split(",")
    names = [str(name).strip() for name in sections]
    unknown = [name for name in names if name not in SECTION_REGISTRY]
    if not names or unknown:
        raise ValueError(
            f"`--sections`: unknown section(s) {', '.join(map(repr, unknown))}; expected "
            f"{', '.join(SECTION_REGISTRY)}"
        )
    return list(dict.fromkeys(names))


def _probabilities(forward: Any, images: Any, device: Any, batch_size: int):
    """Softmax of the model's outputs in batches; a model that fails on the images is a
    one-line ``ValueError`` pointing at ``--transform``."""
    import torch

    from captum_ext.viz.report import _probabilities as batch_probabilities

    chunks = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        chunks.append(batch_probabilities(forward, x).cpu())
    return torch.cat(chunks)


def _loaded_with_weights_warning(
    load_model: Callable[..., Any], spec: str, weights: str | None, device: Any, flags: Any
) -> tuple[Any, str | None]:
    """``load_model(spec, weights, device)`` and the text of its
    :class:`~captum_ext.data.RandomWeightsWarning` (a ``torchvision.models`` builder
    given no ``--weights``), or None: the warning is shown on stderr as every other (it is
    re-issued) and its text goes on the page."""
    from captum_ext.data.loading import RandomWeightsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(spec, weights, device, argument_names=flags)
    untrained = None
    for warning in caught:
        if issubclass(warning.category, RandomWeightsWarning):
            untrained = str(warning.message)
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return model, untrained


def build_section_inputs(
    config: ReportConfig, sections: Sequence[str]
) -> tuple[SectionInputs, dict]:
    """Load the model and images once (:func:`~captum_ext.data.loading.resolve_inputs`) and
    return the :class:`SectionInputs` with the page's metadata."""
    import torch

    from captum_ext._utils.validation import parse_device
    from captum_ext.data.loading import (
        COMMAND_LINE_NAMES,
        check_class_names,
        check_folder_labels,
        check_model_takes,
        denormalize_for_display,
        expose_layer,
        load_model,
        read_class_names,
        resolve_inputs,
        with_logits_output,
    )

    device = parse_device(config.device, argument="--device")
    if config.model is None and config.weights is not None:
        raise ValueError("`--weights` needs `--model` (the architecture the weights are for).")
    flags = COMMAND_LINE_NAMES  # the loaders' errors name the command's options
    out = Path(config.out).expanduser()
    if config.model is None:
        from captum_ext.bundled import load_bundled_model
        from captum_ext.data import BUNDLED_CAM_LAYER, DIGIT_CLASSES

        model = load_bundled_model().to(device)
        model_description = "bundled digit classifier (captum_ext.bundled.load_bundled_model)"
        untrained = None
        layer_name = config.layer or BUNDLED_CAM_LAYER
        default_transform = "digits"
    else:
        model, untrained = _loaded_with_weights_warning(
            load_model, config.model, config.weights, device, flags
        )
        model_description = config.model + (f" + {config.weights}" if config.weights else "")
        if untrained is not None:
            model_description += " (random weights: no --weights)"
        layer_name = None
        default_transform = "imagenet"
    class_names = read_class_names(config.classes, argument_names=flags) if config.classes else None
    if class_names is None and config.model is None:
        class_names = list(DIGIT_CLASSES)
    resolved = resolve_inputs(
        config.images,
        exclude=[config.out],  # the report being written inside --images is not an input
        transform=config.transform,
        default_transform=default_transform,
        class_names=class_names,
        limit=config.limit,
        argument_names=flags,
    )
    from captum_ext._utils.batched_grad import in_model_precision

    # a half-precision model gets its images in its dtype (they load as float32)
    (images,) = in_model_precision(model, (resolved.images,))
    known = class_names is not None or config.images is not None
    labels = resolved.label_list() if known else None
    example = images[:2].to(device)
    check_model_takes(model, example)  # images it cannot take: one line, before any wrapper
    compiled = compiled_model(model)
    if not compiled:  # a TorchScript or exported model: its layer's wrapper is adapted below
        model, adapted = with_logits_output(model, example)
        if adapted:
            print(ADAPTATION_MESSAGES[model.reads])
    if layer_name is None:
        layer_name = pick_layer(model, config.layer)
    trust_problem = None
    if compiled and "trust" in sections:
        # GradTrust reads the final linear layer: run an eager copy of it (same weights)
        try:
            forward = gradtrust_model(model, config.final_layer, example, layer=layer_name)
            layer = forward.tap
        except ValueError as error:
            if config.final_layer is not None or config.sections is not None:
                raise
            trust_problem = error  # the other sections are still possible
            forward, layer = expose_layer(model, layer_name, example=example)
    else:
        forward, layer = expose_layer(model, layer_name, example=example)
    if compiled:  # the wrapper's modules (the layer's tap among them) stay reachable
        forward, adapted = with_logits_output(forward, example)
        if adapted:
            print(ADAPTATION_MESSAGES[forward.reads])
    layer_description = layer_name
    grid = _token_grid(forward, layer, layer_name, example)
    if grid is not None:  # a transformer's tokens or channels-last grid, explained as a map
        forward, layer = grid, grid.grid
        h, w = grid.grid_size
        if grid.layout == "channels_last":
            layer_description = f"{layer_name} (channels last: read as N x C x {h} x {w})"
            said = f"Reading the channels-last output of {layer_name!r} as N x C x {h} x {w}."
        else:
            layer_description = f"{layer_name} (its {h} x {w} patch tokens as a map)"
            said = f"Explaining the {h} x {w} patch tokens of {layer_name!r} as a map" + (
                f" (the {grid.leading} leading token(s) left out)." if grid.leading else "."
            )
        print(said, flush=True)
        layer_name = "grid"  # its name inside the wrapper; the captions show the user's
        grid.grid.layer_name = layer_description
    if class_names is not None:  # before the folders' labels, which the names give (as `score`)
        check_class_names(forward, example[:1], class_names)
    probabilities = _probabilities(forward, images, device, config.batch_size)
    check_folder_labels(resolved.labels, resolved.names, probabilities.shape[1])
    inputs = SectionInputs(
        model=model,
        forward=forward,
        layer=layer,
        layer_name=layer_name,
        images=images,
        display_images=denormalize_for_display(resolved.images, resolved.transform),
        labels=labels,
        names=resolved.names,
        class_names=class_names,
        transform=resolved.transform,
        device=device,
        out=out,
        batch_size=config.batch_size,
        progress=config.progress,
        probabilities=probabilities,
        predictions=probabilities.argmax(dim=1),
        problems={} if trust_problem is None else {"trust": trust_problem},
    )
    metadata = {
        "Model": model_description,
        **({} if untrained is None else {"Warning": untrained}),
        "Layer": layer_description,
        "Images": resolved.description,
        "Transform": resolved.transform,
        "Device": str(device),
        "Sections": ", ".join(sections),
        "torch": torch.__version__,
    }
    return inputs, metadata


@dataclasses.dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` returns: the page, the time per step (seconds, in order,
    the last one ``"(writing the page)"``) and the sections left out with why."""

    index: Path
    timings: list[tuple[str, float]]
    left_out: dict[str, str]


@contextmanager
def _named_file_errors(option: str) -> Iterator[None]:
    """A file that cannot be read as the section's net: the Python API's message (`path`,
    resume=False) becomes one that names the command line's option."""
    try:
        yield
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        text = str(error).replace("`path`: ", "").replace("`path` ", "")
        text = text.replace(" Start the fit afresh (delete the file, or resume=False).", "")
        raise ValueError(f"`{option}`: {text}") from None


#: the file each section needs for a model of your own: (config field, option, what it is)
_SECTION_FILES = {
    "masks": ("mask_net", "--mask-net", "a mask net trained with ActivationMatchingMask.fit "
              "and written with its save method"),
    "introspection": ("introspection_head", "--introspection-head", "an IntrospectiveNetwork "
                      "fitted on your training data and written with its save method"),
}  # fmt: skip


def _missing_section_file(section: str) -> ValueError:
    _, option, what = _SECTION_FILES[section]
    return ValueError(f"the {section} section needs `{option}` for your own model: {what}.")


def _check_section_files(config: ReportConfig, sections: Sequence[str]) -> None:
    """The files a section needs, checked before any work (a missing one was found only when
    its section came, after minutes of the others, leaving their pictures behind)."""
    for section, (field, option, _) in _SECTION_FILES.items():
        if section not in sections:
            continue
        path = getattr(config, field)
        if path is None and config.model is not None:
            raise _missing_section_file(section)
        if path is not None and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"`{option}`: no file at {str(path)!r}.")


def _images_read_under(root: Path, folder: Path) -> int:
    """How many of the images an image-folder read of ``root`` takes (by the loader's own
    rules: hidden names and earlier reports' folders skipped, symbolic links followed) lie
    in ``folder``: the ones a report marker there would hide from later runs."""
    from captum_ext.data.loading import IMAGE_EXTENSIONS, _find_images

    with warnings.catch_warnings():  # the read proper says what it skips
        warnings.simplefilter("ignore")
        found = _find_images(root, IMAGE_EXTENSIONS)
    inside = os.path.realpath(folder)
    return sum(
        1
        for path in found
        if Path(os.path.realpath(path)).is_relative_to(inside)
        or Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder))
    )


def _check_out_beside_images(out: Path, images: str | os.PathLike | None) -> None:
    """Refuse, before any work, an ``--out`` that would take the place of ``--images``: the
    ``--images`` folder itself, or an existing folder inside it (or around it) that holds
    images and is not an earlier report's. The report marks its folder
    (:data:`~captum_ext.data.loading.REPORT_MARKER`) so that image folders read later skip
    it: the images there were left out of this run and of every later ``report`` and
    ``score`` on that folder, silently. A new or empty folder inside ``--images``, or an
    earlier report's, is fine (it is not read as input)."""
    from captum_ext.data.loading import REPORT_MARKER

    if images is None:
        return
    root = Path(images).expanduser()
    if not root.is_dir():
        return  # the loader says what is wrong with it
    real_out, real_root = Path(os.path.realpath(out)), Path(os.path.realpath(root))
    if real_out == real_root:
        raise ValueError(
            f"`--out` {str(out)!r} is the `--images` folder {str(images)!r}: the report "
            "would be written among the images it reads; give `--out` another folder (e.g. "
            "'report', the default, outside `--images` or in a new folder inside it)."
        )
    if not out.is_dir():
        return  # a new folder
    if real_out.is_relative_to(real_root):
        hidden = _images_read_under(root, out)
        if hidden:
            raise ValueError(
                f"`--out` {str(out)!r} is a folder inside `--images` {str(images)!r} that "
                f"holds {hidden} of its images: they would be left out of this report, and of "
                "every later run on `--images` (a report's folder is skipped when images are "
                "read); give `--out` a new or empty folder."
            )
    elif real_root.is_relative_to(real_out) and not (out / REPORT_MARKER).exists():
        raise ValueError(
            f"`--out` {str(out)!r} holds the `--images` folder {str(images)!r}: its images "
            "would be left out of every later run on a folder holding `--out` (a report's "
            "folder is skipped when images are read); give `--out` a new or empty folder."
        )


def _claim_output_folder(out: Path) -> None:
    """Mark ``out`` as a report folder (image folders read later skip it) and remove the page
    of an earlier run there: this run rewrites the pictures it shows, so a run that fails
    halfway must not leave that page beside another run's pictures."""
    from captum_ext.data.loading import REPORT_MARKER

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARKER).touch()
    (out / "index.html").unlink(missing_ok=True)


def build_report(config: ReportConfig) -> ReportResult:
    """Do what ``captum-ext report`` does: load the model and images once
    (:class:`SectionInputs`), build each section of ``config.sections`` from
    :data:`SECTION_REGISTRY` (timing each), write ``config.out/index.html``.

    A section the user did not ask for by name that cannot be built for this model (GradTrust
    on a compiled final layer, an inversion generator that would not fit in memory) is left
    out with one line on stderr and in the page's metadata; asked for by name it raises.
    Every figure is listed in ``images/.captum-ext-figures`` as it is written, so that after
    a run that fails or is stopped part-way (an error, Ctrl-C, SIGTERM, even SIGKILL) the
    next run into ``config.out`` removes those it does not use (see :meth:`Report.write`).

    Args:
        config (ReportConfig): the report's settings.

    Returns:
        ``ReportResult``: ``index`` (the path of the page), ``timings`` (seconds per step,
        in order) and ``left_out`` (each section left out, with why).

    Raises:
        Exception: ``OutputError`` if ``config.out`` cannot be written (checked before any
            work); ``SectionTooBigError`` if a section asked for by name does not fit in
            memory (both defined in ``captum_ext.viz.build``).
        ValueError, TypeError, OSError: bad settings, as one line naming the option.

    Examples::

        >>> from captum_ext.viz import ReportConfig, build_report
        >>> config = ReportConfig(limit=2, sections=["contrastive"], out="report")
        >>> result = build_report(config)
        >>> result.index.name
        'index.html'
    """
    from captum_ext.viz._figures import recording_figures
    from captum_ext.viz.report import Report, figure_noter, list_written_figures, require_jinja2

    require_jinja2()  # before any section's work, not when the page is written
    asked = config.sections is not None
    sections = _check_sections(config.sections) if asked else default_sections(config)
    out = Path(config.out).expanduser()
    if config.model is None and config.weights is not None:
        raise ValueError("`--weights` needs `--model` (the architecture the weights are for).")
    if config.mask_layers is not None and config.mask_net is None:
        raise ValueError(
            "`--mask-layers` needs `--mask-net` (the layers that mask net was trained to "
            "match); the bundled mask net matches its own layer."
        )
    _check_out_beside_images(out, config.images)
    check_output(out, folder=True)
    _check_section_files(config, sections)
    inputs, metadata = build_section_inputs(config, sections)
    report = Report(config.title or "captum-ext report", metadata=metadata)
    timings: list[tuple[str, float]] = []
    left_out: dict[str, str] = {}
    with writing_to(out):
        _claim_output_folder(out)
        # each figure is listed in the folder's list of figures before it is written
        with recording_figures(figure_noter(out)) as written:
            try:
                for name in sections:
                    started = time.perf_counter()
                    try:
                        built = SECTION_REGISTRY[name].build(inputs, config, asked)
                        if isinstance(built, str):
                            print(f"captum-ext report: {built}", file=sys.stderr)
                            label, _, reason = built.partition(" left out: ")
                            left_out[name] = reason
                            report.metadata.append((label.capitalize(), f"left out: {reason}"))
                        else:
                            report.add_section(built)
                    finally:
                        timings.append((name, time.perf_counter() - started))
                started = time.perf_counter()
                index = report.write(out)
                timings.append(("(writing the page)", time.perf_counter() - started))
            except BaseException:
                # listed as they were written; again here in case that list could not be
                # appended to then (a later run removes what this one wrote)
                list_written_figures(out, written)
                raise
    return ReportResult(Path(index), timings, left_out)


def format_timings(timings: Sequence[tuple[str, float]]) -> str:
    """The time each section took, one line each, as ``captum-ext report`` prints at the end."""
    width = max(len(name) for name, _ in timings)
    lines = ["Time per section:"]
    lines += [f"  {name:<{width}}  {seconds:8.1f} s" for name, seconds in timings]
    lines.append(f"  {'total':<{width}}  {sum(s for _, s in timings):8.1f} s")
    return "\n".join(lines)
