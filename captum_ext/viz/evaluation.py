"""The report's evaluation section: every method's maps scored by every evaluation metric.

:func:`compute_evaluation` returns numbers only (testable without matplotlib);
:func:`render_evaluation` draws them into a report :class:`~captum_ext.viz.report.Section`;
:func:`evaluation_section` does both (``captum-ext report --sections evaluation``).

Methods: Saliency, Integrated Gradients (zero baseline), Guided Backprop, GradCAM,
ContrastCAM and FinerCAM (at ``layer``, upsampled), LayerIBA at ``layer`` (its
statistics estimated on all the images given; bits per position, upsampled) and
PathwayGradient (sparsity 0.7). LayerIBA smooths its mask with a Gaussian of sigma 1 (5 x 5)
where the layer's maps are larger than 2 x 2, and not at all on smaller maps (``sigma=None``:
nothing to smooth over). PathwayGradient scores the outputs of ``nn.ReLU`` modules; a model
without any (GELU, SiLU, or a relu called as a function) skips it with a note, as a model
whose last layer is not a linear one randomises its last layer with a weight (SqueezeNet's
final 1 x 1 convolution). Where 70 % or more of a network's ReLU outputs score zero
for an image (a max pooling after each ReLU discards three quarters of them; on the bundled
digit model 90 % score zero), sparsity 0.7 prunes only neurons that carry nothing, and
PathwayGradient's map is the plain signed gradient: its sanity-check numbers, which compare
absolute values, then equal Saliency's exactly. Metrics, each the mean over the images:

============================  =======  ==================================================
metric                        better   what it is
============================  =======  ==================================================
deletion AUC                  lower    :func:`~captum_ext.metrics.deletion`
insertion AUC                 higher   :func:`~captum_ext.metrics.insertion`
ROAD (MoRF)                   lower    mean target probability along
                                       :func:`~captum_ext.metrics.road`
completeness                  higher   mean drop of :func:`~captum_ext.metrics.completeness`
class sensitivity             lower    Spearman of |maps| for the prediction and the
                                       runner-up (:func:`~captum_ext.metrics.class_sensitivity`)
randomisation                 lower    Spearman of |maps| before and after randomising the
                                       last layer (:func:`~captum_ext.metrics.model_randomisation`)
============================  =======  ==================================================
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from captum.log import log_usage
from torch import Tensor, nn

from captum_ext._utils.layers import (
    find_last_linear,
    last_weighted_layer,
    resolve_layer,
    uncompiled,
    user_model,
)
from captum_ext._utils.model_state import leaves_inference_mode, preserved_state
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.training import progress_bar
from captum_ext._utils.validation import check_int, runner_up_classes
from captum_ext.viz.report import _model_device, empty_maps

__all__ = ["EvaluationScores", "compute_evaluation", "evaluation_section", "render_evaluation"]

#: the images the report's evaluation section scores: the first ones (ROAD's imputation and
#: the sanity checks take seconds to minutes per image at 224 x 224 on a CPU)
EVALUATION_IMAGES = 4

#: the most samples (images x interpolation steps) Integrated Gradients puts through one
#: backward pass here, at most the ``batch_size`` given: its 16 steps of 4 images, stacked
#: twice by class_sensitivity, were 128 ResNet-18 samples at 224 x 224 in one pass (4 GB)
_MAX_INTERNAL_BATCH = 16

#: metric name -> True when higher is better
METRIC_DIRECTIONS: dict[str, bool] = {
    "deletion AUC": False,
    "insertion AUC": True,
    "ROAD (MoRF)": False,
    "completeness": True,
    "class sensitivity": False,
    "randomisation": False,
}


@dataclasses.dataclass(frozen=True)
class EvaluationScores:
    """What :func:`compute_evaluation` returns.

    Attributes:
        methods (list of str): the methods, in table order.
        n_images (int): how many images were scored.
        scores (dict): metric name -> method name -> the mean over the images (``nan`` when
            the method or the metric could not run on this model; see ``notes``).
        road_percentages (Tensor): ``(P,)`` fractions removed along the ROAD curve.
        road_curves (dict): method -> ``(P,)`` mean target probability along ROAD.
        notes (list of str): one line per method or metric that could not run, and why.
        remarks (list of str): one line per method or metric that ran with another setting
            than the usual one for this model, and why (e.g. LayerIBA unsmoothed on maps too
            small for its smoothing).
        empty (dict): method -> how many of its maps of the images are empty (every value
            0, ``empty_maps``). Those images are left out of the
            method's scores (a metric would score the raster order of the pixels, a sanity
            check constants); a method whose every map is empty scores ``nan`` (n/a).
    """

    methods: list[str]
    n_images: int
    scores: dict[str, dict[str, float]]
    road_percentages: Tensor
    road_curves: dict[str, Tensor]
    notes: list[str]
    remarks: list[str] = dataclasses.field(default_factory=list)
    empty: dict[str, int] = dataclasses.field(default_factory=dict)

    def best(self, metric: str) -> str | None:
        """The method with the best finite value of ``metric`` (None if none; the first in
        table order among tied methods, all of which :meth:`best_methods` gives)."""
        tied = self.best_methods(metric)
        return tied[0] if tied else None

    def best_methods(self, metric: str) -> list[str]:
        """Every method whose finite value of ``metric`` is the best one, in table order
        (several on an exact tie; empty if none is finite)."""
        values = {m: v for m, v in self.scores[metric].items() if v == v}
        if not values:
            return []
        pick = max if METRIC_DIRECTIONS[metric] else min
        top = pick(values.values())
        return [method for method in self.methods if values.get(method) == top]


def _users_model(model: nn.Module) -> nn.Module:
    """The model the user gave, inside the wrappers of this package that the report puts
    around it (:class:`~captum_ext.token_grid.TokenGridModel`,
    :class:`~captum_ext.data.LogitsOutput`, a TorchScript model's layer wrapper): the one
    whose class a note should name."""
    model = user_model(model)
    while type(model).__module__.startswith("captum_ext."):
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "script_module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            break
        model = user_model(inner)
    return model


def _class_name(model: nn.Module) -> str:
    model = _users_model(model)
    return getattr(model, "original_name", None) or type(model).__name__  # TorchScript's own


#: LayerIBA's smoothing of its mask in the evaluation (its default)
_IBA_SIGMA = 1.0


def _iba_sigma(iba: Any) -> float | None:
    """LayerIBA's ``sigma`` for the layer whose statistics ``iba`` holds: the default, or
    None (no smoothing) where the layer's h x w maps are too small for its blur."""
    from captum_ext.attr.layer_iba import gaussian_taps

    mean = getattr(iba, "mean", None)
    if not isinstance(mean, Tensor) or mean.dim() < 3:
        return _IBA_SIGMA  # not an (h, w) grid: LayerIBA says what it needs
    pad = (len(gaussian_taps(_IBA_SIGMA)) - 1) // 2
    return None if pad >= min(mean.shape[-2:]) else _IBA_SIGMA


def _no_relu_note(model: nn.Module) -> str | None:
    """The note for PathwayGradient on a model with no ``nn.ReLU`` module (its neurons are
    the outputs of those), else None."""
    if isinstance(model, torch.jit.ScriptModule) or any(
        isinstance(m, nn.ReLU) for m in model.modules()
    ):
        return None  # PathwayGradient finds its neurons, or says why it cannot
    others = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__module__ == "torch.nn.modules.activation"
        }
    )
    has = f" (its activations: {', '.join(others)})" if others else ""
    return (
        f"PathwayGradient: {_class_name(model)} has no nn.ReLU modules{has}, and "
        "PathwayGradient's neurons are the outputs of nn.ReLU modules (a relu called as a "
        "function cannot be hooked), so it is skipped for this model"
    )


#: the start of PathwayGradient's warning that ``layers=None`` scores the nn.ReLU modules only
def _remark_unscored_activations(warning: Any, remarks: list[str]) -> None:
    """Add (once) the remark for PathwayGradient's warning that it scored only the model's
    ``nn.ReLU`` outputs (its counts), worded for the reader of the evaluation."""
    if any(line.startswith("PathwayGradient: scored only") for line in remarks):
        return
    relus = warning.relus
    others = ", ".join(f"{n} {name}" for name, n in warning.others.items())
    remarks.append(
        f"PathwayGradient: scored only the outputs of the model's {relus} nn.ReLU "
        f"module{'s' if relus != 1 else ''}, so its other activations ({others}) are not part "
        "of the pathway"
    )


def _explainers(
    model: nn.Module,
    layer: nn.Module,
    statistics_images: Tensor,
    remarks: list[str] | None = None,
    internal_batch_size: int = _MAX_INTERNAL_BATCH,
) -> dict[str, Callable[[nn.Module], Any]]:
    """method -> ``factory(model) -> (attribute(inputs, target) -> maps at input size)``.

    ``statistics_images``: the images whose activations give LayerIBA its per-feature mean
    and std (estimated again for every model the factory is given, e.g. a randomised one).
    ``remarks``: where LayerIBA's maps go unsmoothed (:func:`_iba_sigma`) a line is added
    (once). ``internal_batch_size``: the most samples (images x steps) Integrated Gradients
    puts through one backward pass, or the number of images when that is larger (each pass
    takes every image at least once; the other methods take one sample per image)."""
    from captum.attr import GuidedBackprop, IntegratedGradients, Saliency

    from captum_ext.attr import ContrastCAM, FinerCAM, GradCAM, LayerIBA, PathwayGradient
    from captum_ext.attr.layer_iba import gaussian_taps
    from captum_ext.attr.pathway_gradient import _UnscoredActivationsWarning

    names = {id(module): name for name, module in model.named_modules()}
    layer_name = names[id(layer)]

    class _Adapter:
        """Captum's ``attribute(inputs, target)`` face for a map function (what
        :func:`~captum_ext.metrics.model_randomisation` and ``class_sensitivity`` call)."""

        def __init__(self, attribute: Callable[[Tensor, Tensor], Tensor]) -> None:
            self.attribute = log_usage()(attribute)

    def gradcam(m: nn.Module) -> _Adapter:
        cam = GradCAM(m, m.get_submodule(layer_name))
        return _Adapter(lambda x, target: cam.attribute(x, target=target, upsample_to_input=True))

    def contrastcam(m: nn.Module) -> _Adapter:
        cam = ContrastCAM(m, m.get_submodule(layer_name))

        def attribute(x: Tensor, target: Tensor) -> Tensor:
            # "why the prediction, rather than the runner-up?" (target is the prediction
            # here). The runner-up is the trained model's, also for a randomised copy `m`:
            # the sanity check must compare maps of the same question
            with torch.no_grad():
                runner_up = runner_up_classes(model(x), target)
            return cam.attribute(x, contrast=runner_up, upsample_to_input=True)

        return _Adapter(attribute)

    def finercam(m: nn.Module) -> _Adapter:
        cam = FinerCAM(m, m.get_submodule(layer_name))

        def attribute(x: Tensor, target: Tensor) -> Tensor:
            with warnings.catch_warnings():
                # confident predictions: the maps shrink towards 0 (ranks survive; all-zero
                # maps score like any tie), which the docs of FinerCAM explain
                warnings.filterwarnings("ignore", message="FinerCAM:", category=RuntimeWarning)
                return cam.attribute(x, target=target, upsample_to_input=True)

        return _Adapter(attribute)

    def layer_iba(m: nn.Module) -> _Adapter:
        iba = LayerIBA(m, m.get_submodule(layer_name))
        iba.estimate(statistics_images)
        sigma = _iba_sigma(iba)
        if (
            sigma is None
            and remarks is not None
            and not any(line.startswith("LayerIBA:") for line in remarks)
        ):
            h, w = iba.mean.shape[-2:]
            side = len(gaussian_taps(_IBA_SIGMA))
            remarks.append(
                f"LayerIBA: the layer's {h} x {w} maps are too small for its smoothing (a "
                f"Gaussian of sigma {_IBA_SIGMA:g}, {side} x {side}), so its masks are not "
                "smoothed (sigma=None); a layer with larger maps gets the smoothing"
            )

        def attribute(x: Tensor, target: Tensor) -> Tensor:
            # one seed per example: an image's noise, and so its map, does not depend on the
            # other images or its place among them (class_sensitivity stacks the batch twice)
            return iba.attribute(x, target=target, generator=[0] * x.shape[0], sigma=sigma)

        return _Adapter(attribute)

    def pathway_gradient(m: nn.Module) -> _Adapter:
        pathway = PathwayGradient(m)

        def attribute(x: Tensor, target: Tensor) -> Tensor:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", _UnscoredActivationsWarning)
                maps = pathway.attribute(x, target=target)
            for warning in caught:  # its advice is for a caller of the Python API: a remark
                if issubclass(warning.category, _UnscoredActivationsWarning):
                    if remarks is not None:
                        _remark_unscored_activations(warning.message, remarks)
                else:
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
            return maps

        return _Adapter(attribute)

    def integrated(m: nn.Module) -> _Adapter:
        ig = IntegratedGradients(m)

        def attribute(x: Tensor, target: Tensor) -> Tensor:
            # Captum takes no fewer samples per pass than the images (it would warn and do so)
            chunk = max(internal_batch_size, x.shape[0])
            return ig.attribute(x, target=target, n_steps=16, internal_batch_size=chunk)

        return _Adapter(attribute)

    return {
        "Saliency": lambda m: Saliency(m),
        "Integrated Gradients": integrated,
        "Guided Backprop": lambda m: GuidedBackprop(m),
        "GradCAM": gradcam,
        "ContrastCAM": contrastcam,
        "FinerCAM": finercam,
        "LayerIBA": layer_iba,
        "PathwayGradient": pathway_gradient,
    }


def _maps(explainer: Any, x: Tensor, target: Tensor) -> Tensor:
    maps = explainer.attribute(x.clone(), target=target)
    maps = maps[0] if isinstance(maps, tuple) else maps
    maps = at_least_float32(maps.detach()).sum(dim=1, keepdim=True)  # no float16 overflow
    if maps.shape[-2:] != x.shape[-2:]:
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps


def _top_layer(
    model: nn.Module, run: Callable[[], Any], notes: list[str], remarks: list[str]
) -> str | None:
    """The layer the randomisation check randomises: the final linear layer, or for a model
    without one its last layer with a weight (a remark says which); None (and a note) where
    neither is found."""
    try:
        return find_last_linear(model, run, remedy="pass `{argument}`")[0]
    except ValueError:
        pass
    last = last_weighted_layer(model, run)
    if last is None:
        notes.append(
            f"randomisation: {_class_name(model)} runs no final layer with a weight (linear "
            "or convolution) to randomise"
        )
        return None
    shown = {id(m): n for n, m in _users_model(model).named_modules()}.get(id(last[1]), last[0])
    remarks.append(
        f"randomisation: {_class_name(model)} has no linear layer, so its last layer with a "
        f"weight, {shown} ({type(last[1]).__name__}), is the one randomised"
    )
    return last[0]


@leaves_inference_mode  # Captum's methods cannot differentiate inside inference mode
def compute_evaluation(
    model: nn.Module,
    layer: Any,
    images: Tensor,
    *,
    batch_size: int = 64,
    deletion_steps: int = 10,
    road_percentages: Sequence[float] = (0.25, 0.5),
    completeness_thresholds: Sequence[float] = (0.5,),
    max_images: int | None = EVALUATION_IMAGES,
    progress: bool = False,
) -> EvaluationScores:
    """Score every method's maps of ``images`` (explaining the predictions) by every metric.

    Only the first ``max_images`` images are used (None: all): ROAD's imputation solves a
    sparse system per image and removal, seconds each at 224 x 224 on a CPU. ``batch_size``
    bounds the images of each metric's forward passes and, with at most 16, the samples
    (images x steps) of each backward pass of Integrated Gradients. A method's empty maps
    (every value 0) are left out of its scores, all of them n/a when every map is empty
    (``empty`` counts them; a remark or note says so). The model is put
    in eval mode for the computation and restored afterwards; the randomisation check works
    on a deep copy. Captum's warnings (e.g. Guided Backprop's about reused ReLU modules) are
    silenced here. A method or metric that cannot run on the
    model (e.g. Guided Backprop on a model that reuses one ReLU module) gets ``nan`` and a
    line in ``notes``. ``progress``: a bar over the methods on stderr (each takes seconds to
    minutes at 224 x 224 on a CPU).
    """
    from captum_ext.metrics import (
        class_sensitivity,
        completeness,
        deletion,
        insertion,
        model_randomisation,
        road,
    )

    model = uncompiled(model)  # the methods are built on (copies of) the eager module
    module = resolve_layer(model, layer)
    images = images.to(_model_device(model, images))
    remarks: list[str] = []
    batch_size = check_int(batch_size, "batch_size")
    explainers = _explainers(
        model, module, images, remarks, internal_batch_size=min(batch_size, _MAX_INTERNAL_BATCH)
    )
    if max_images is not None:
        images = images[: check_int(max_images, "max_images")]
    scores: dict[str, dict[str, float]] = {metric: {} for metric in METRIC_DIRECTIONS}
    road_curves: dict[str, Tensor] = {}
    notes: list[str] = []
    empty: dict[str, int] = {}
    nan = float("nan")
    bar = progress_bar(len(explainers), bool(progress), desc="evaluation", unit="method")
    with preserved_state([model]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="captum")
        model.eval()
        with torch.no_grad():
            target = model(images).argmax(dim=1)
        top_layer = _top_layer(model, lambda: model(images[:1]), notes, remarks)
        skipped = {"PathwayGradient": _no_relu_note(model)}
        for done, (name, factory) in enumerate(explainers.items()):
            if bar is not None and done:
                bar.update(1)  # the method before this one is scored
            if skipped.get(name) is not None:  # a method with nothing to work on here
                notes.append(skipped[name])
                for metric in METRIC_DIRECTIONS:
                    scores[metric][name] = nan
                continue
            try:
                maps = _maps(factory(model), images, target)
            except Exception as error:  # a method that cannot run on this model is a finding
                notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
                for metric in METRIC_DIRECTIONS:
                    scores[metric][name] = nan
                continue
            kept = torch.from_numpy(~empty_maps(maps)).to(maps.device)
            empty[name] = int((~kept).sum())
            if empty[name] == len(kept):  # nothing to score: the metrics would read constants
                notes.append(_empty_note(name, empty[name]))
                for metric in METRIC_DIRECTIONS:
                    scores[metric][name] = nan
                continue
            scored_images, scored_target = images, target
            if empty[name]:
                remarks.append(_empty_note(name, empty[name], len(kept)))
                scored_images, scored_target, maps = images[kept], target[kept], maps[kept]
            common = {"target": scored_target}
            scores["deletion AUC"][name] = float(
                deletion(
                    model,
                    scored_images,
                    maps,
                    n_steps=deletion_steps,
                    batch_size=batch_size,
                    **common,
                ).mean()
            )
            scores["insertion AUC"][name] = float(
                insertion(
                    model,
                    scored_images,
                    maps,
                    n_steps=deletion_steps,
                    batch_size=batch_size,
                    **common,
                ).mean()
            )
            curves = road(
                model,
                scored_images,
                maps,
                percentages=road_percentages,
                batch_size=batch_size,
                **common,
            )
            road_curves[name] = curves.probability.cpu().double().mean(dim=0)
            scores["ROAD (MoRF)"][name] = float(curves.probability.cpu().double().mean())
            scores["completeness"][name] = float(
                completeness(
                    model,
                    scored_images,
                    maps,
                    thresholds=completeness_thresholds,
                    batch_size=batch_size,
                    **common,
                ).drop.mean()
            )
            if name == "ContrastCAM":
                # it always explains the prediction (against a contrast class): no second class
                scores["class sensitivity"][name] = nan
            else:
                sensitivity = class_sensitivity(
                    factory, model, scored_images, similarity="spearman_abs"
                ).similarity["spearman_abs"]
                scores["class sensitivity"][name] = float(sensitivity.mean())
            if top_layer is None:
                scores["randomisation"][name] = nan
            else:
                randomised = model_randomisation(
                    factory, model, scored_images, layers=[top_layer], similarity="spearman_abs"
                )
                scores["randomisation"][name] = float(
                    randomised.similarity["spearman_abs"][0].mean()
                )
    if bar is not None:
        bar.update(1)
        bar.close()
    return EvaluationScores(
        methods=list(explainers),
        n_images=int(images.shape[0]),
        scores=scores,
        road_percentages=torch.tensor(list(road_percentages), dtype=torch.float64),
        road_curves=road_curves,
        notes=notes,
        remarks=remarks,
        empty=empty,
    )


def _empty_note(method: str, count: int, total: int | None = None) -> str:
    """The note (every map empty: ``total`` None) or remark (``count`` of ``total``) on a
    method's empty maps (every value 0)."""
    if total is None:
        return (
            f"{method}: every map ({count} image{'s' if count != 1 else ''}) is empty (all "
            "zero, no evidence at all), so there is nothing to score (n/a)"
        )
    return (
        f"{method}: {count} of its {total} maps are empty (all zero, no evidence at all), so "
        f"it is scored on the other {total - count} images"
    )


def render_evaluation(scores: EvaluationScores, out_dir: str | Path) -> Any:
    """The report section of :func:`compute_evaluation`'s numbers: the table (the best value
    of each metric marked with a star) and the ROAD curves.

    The plot is a :class:`matplotlib.figure.Figure` of its own: no pyplot state (backend,
    open figures, the current figure) is read or changed."""
    from captum_ext.viz._figures import legend_as_given, new_figure, save_figure
    from captum_ext.viz.report import Figure, Section, Table

    metrics = list(METRIC_DIRECTIONS)
    columns = ["method"] + [
        f"{metric} ({'higher' if METRIC_DIRECTIONS[metric] else 'lower'} is better)"
        for metric in metrics
    ]
    table = Table(
        columns,
        caption="Mean over the images; * marks the best of each column (every method on a "
        "tie). The sanity checks compare the absolute values of the maps (Spearman of |maps|).",
    )
    best = {metric: scores.best_methods(metric) for metric in metrics}
    for method in scores.methods:
        cells = [method]
        for metric in metrics:
            value = scores.scores[metric][method]
            text = "n/a" if value != value else f"{value:.3f}"
            if value != value and scores.empty.get(method) == scores.n_images:
                text = "n/a (empty)"
            cells.append(text + (" *" if method in best[metric] else ""))
        table.add_row(cells)

    figure = new_figure(420, 300, layout=None)
    axis = figure.subplots()
    lines, methods = [], []
    for method, curve in scores.road_curves.items():
        (line,) = axis.plot(scores.road_percentages.numpy(), curve.numpy(), marker="o")
        lines.append(line)
        methods.append(str(method))
    axis.set_xlabel("fraction of pixels removed (most relevant first)")
    axis.set_ylabel("probability of the prediction")
    axis.set_title("ROAD (lower = the map found what matters)", fontsize=9)
    if lines:  # every method under its own name, also one starting with "_"
        legend_as_given(
            axis, lines, methods, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5)
        )
    try:
        path = save_figure(
            figure, Path(out_dir) / "images" / "evaluation" / "road.png", bbox_inches="tight"
        )
    finally:
        figure.clear()  # its memory goes now, also when the PNG cannot be written

    intro = (
        f"Which explanation to trust for this model: each method's maps of {scores.n_images} "
        "images, scored by "
        "the perturbation metrics (deletion, insertion, ROAD, completeness) and the sanity "
        "checks (how much the maps change with the explained class and with the last layer's "
        "weights randomised; a map that does not change is not explaining the model)."
    )
    if scores.notes:
        intro += " Not computed: " + "; ".join(note.rstrip(".") for note in scores.notes) + "."
    if scores.remarks:
        intro += " Settings: " + "; ".join(line.rstrip(".") for line in scores.remarks) + "."
    section = Section("Evaluation of the explanations", intro)
    section.add_row(
        "Scores", [Figure("ROAD curves", path, width=420)], table=table, per_image=False
    )
    return section


def evaluation_section(
    model: nn.Module,
    layer: Any,
    images: Tensor,
    display_images: Any,
    class_names: Any,
    out_dir: str | Path,
    *,
    labels: Any = None,
    names: Any = None,
    batch_size: int = 64,
    progress: bool = True,
    **options: Any,
) -> Any:
    """:func:`compute_evaluation` then :func:`render_evaluation` (the report section)."""
    del display_images, class_names, labels, names  # the section shows a summary only
    scores = compute_evaluation(
        model, layer, images, batch_size=batch_size, progress=progress, **options
    )
    return render_evaluation(scores, out_dir)
