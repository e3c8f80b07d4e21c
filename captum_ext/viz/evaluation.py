"""The report's evaluation section: every method's maps scored by every evaluation metric.

:func:`compute_evaluation` returns numbers only (testable without matplotlib);
:func:`render_evaluation` draws them into a report :class:`~captum_ext.viz.report.Section`;
:func:`evaluation_section` does both (``captum-ext report --sections evaluation``).

Methods: Saliency, Integrated Gradients (zero baseline), Guided Backprop, GradCAM,
ContrastCAM and FinerCAM (at ``layer``, upsampled), LayerIBA at ``layer`` (its
statistics estimated on all the images given; bits per position, upsampled) and
PathwayGradient (sparsity 0.7). Where 70 % or more of a network's ReLU outputs score zero
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

from captum_ext._utils.layers import find_last_linear, resolve_layer, uncompiled
from captum_ext._utils.model_state import leaves_inference_mode, preserved_state
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.training import progress_bar
from captum_ext._utils.validation import check_int, runner_up_classes
from captum_ext.viz.report import _model_device

__all__ = ["EvaluationScores", "compute_evaluation", "evaluation_section", "render_evaluation"]

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
    """

    methods: list[str]
    n_images: int
    scores: dict[str, dict[str, float]]
    road_percentages: Tensor
    road_curves: dict[str, Tensor]
    notes: list[str]

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


def _explainers(
    model: nn.Module, layer: nn.Module, statistics_images: Tensor
) -> dict[str, Callable[[nn.Module], Any]]:
    """method -> ``factory(model) -> (attribute(inputs, target) -> maps at input size)``.

    ``statistics_images``: the images whose activations give LayerIBA its per-feature mean
    and std (estimated again for every model the factory is given, e.g. a randomised one)."""
    from captum.attr import GuidedBackprop, IntegratedGradients, Saliency

    from captum_ext.attr import ContrastCAM, FinerCAM, GradCAM, LayerIBA, PathwayGradient

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

        def attribute(x: Tensor, target: Tensor) -> Tensor:
            # one seed per example: an image's noise, and so its map, does not depend on the
            # other images or its place among them (class_sensitivity stacks the batch twice)
            return iba.attribute(x, target=target, generator=[0] * x.shape[0])

        return _Adapter(attribute)

    def integrated(m: nn.Module) -> _Adapter:
        ig = IntegratedGradients(m)
        return _Adapter(lambda x, target: ig.attribute(x, target=target, n_steps=16))

    return {
        "Saliency": lambda m: Saliency(m),
        "Integrated Gradients": integrated,
        "Guided Backprop": lambda m: GuidedBackprop(m),
        "GradCAM": gradcam,
        "ContrastCAM": contrastcam,
        "FinerCAM": finercam,
        "LayerIBA": layer_iba,
        "PathwayGradient": lambda m: PathwayGradient(m),
    }


def _maps(explainer: Any, x: Tensor, target: Tensor) -> Tensor:
    maps = explainer.attribute(x.clone(), target=target)
    maps = maps[0] if isinstance(maps, tuple) else maps
    maps = at_least_float32(maps.detach()).sum(dim=1, keepdim=True)  # no float16 overflow
    if maps.shape[-2:] != x.shape[-2:]:
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return maps


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
    max_images: int | None = 4,
    progress: bool = False,
) -> EvaluationScores:
    """Score every method's maps of ``images`` (explaining the predictions) by every metric.

    Only the first ``max_images`` images are used (None: all): ROAD's imputation solves a
    sparse system per image and removal, seconds each at 224 x 224 on a CPU. The model is put
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
    explainers = _explainers(model, module, images)
    if max_images is not None:
        images = images[: check_int(max_images, "max_images")]
    scores: dict[str, dict[str, float]] = {metric: {} for metric in METRIC_DIRECTIONS}
    road_curves: dict[str, Tensor] = {}
    notes: list[str] = []
    nan = float("nan")
    bar = progress_bar(len(explainers), bool(progress), desc="evaluation", unit="method")
    with preserved_state([model]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="captum")
        model.eval()
        with torch.no_grad():
            target = model(images).argmax(dim=1)
        try:
            top_layer, _ = find_last_linear(model, lambda: model(images[:1]))
        except ValueError:
            top_layer = None
            notes.append("randomisation: no final linear layer found to randomise")
        for done, (name, factory) in enumerate(explainers.items()):
            if bar is not None and done:
                bar.update(1)  # the method before this one is scored
            try:
                maps = _maps(factory(model), images, target)
            except Exception as error:  # a method that cannot run on this model is a finding
                notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0]}")
                for metric in METRIC_DIRECTIONS:
                    scores[metric][name] = nan
                continue
            common = {"target": target}
            scores["deletion AUC"][name] = float(
                deletion(
                    model, images, maps, n_steps=deletion_steps, batch_size=batch_size, **common
                ).mean()
            )
            scores["insertion AUC"][name] = float(
                insertion(
                    model, images, maps, n_steps=deletion_steps, batch_size=batch_size, **common
                ).mean()
            )
            curves = road(
                model, images, maps, percentages=road_percentages, batch_size=batch_size, **common
            )
            road_curves[name] = curves.probability.cpu().double().mean(dim=0)
            scores["ROAD (MoRF)"][name] = float(curves.probability.cpu().double().mean())
            scores["completeness"][name] = float(
                completeness(
                    model,
                    images,
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
                    factory, model, images, similarity="spearman_abs"
                ).similarity["spearman_abs"]
                scores["class sensitivity"][name] = float(sensitivity.mean())
            if top_layer is None:
                scores["randomisation"][name] = nan
            else:
                randomised = model_randomisation(
                    factory, model, images, layers=[top_layer], similarity="spearman_abs"
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
