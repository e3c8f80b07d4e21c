r"""Report section "Which predictions can I trust?" (GradTrust and the baselines).

:func:`trust_section` scores every image with GradTrust and the trust baselines of
:mod:`captum_ext.metrics` (through :func:`~captum_ext.metrics.score_dataset`), then shows

- the paper's figure: GradTrust against softmax confidence, one dot per image, green where the
  prediction is correct and red where it is wrong;
- the accuracy-retention curve of every score (accuracy of the images kept above each
  percentile of the score), with its AUAC in the legend, and a table of AUAC, AUFC and
  misprediction AUROC;
- the least-trusted images (lowest GradTrust) with their Grad-CAM ("Why P?") and ContrastCAM
  against the runner-up ("Why P, rather than Q?").

:func:`trust_section` is :func:`compute_trust` (the numbers, as a :class:`TrustData`: scores,
AUAC, AUFC, AUROC, retention curves, the least-trusted images and their maps; no drawing) followed
by :func:`render_trust` (the plots, overlays and the :class:`~captum_ext.viz.report.Section`).

Paper: M. Prabhushankar and G. AlRegib, "Counterfactual Gradients-based Quantification of
Prediction Trust in Neural Networks", IEEE MIPR 2024 (arXiv 2405.13758).

Example::

    >>> from captum_ext.bundled import load_bundled_model
    >>> from captum_ext.data import (BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits,
    ...                              load_sample_digits)
    >>> from captum_ext.viz import Report, trust_section
    >>> model = load_bundled_model()
    >>> images, labels = load_sample_digits()
    >>> report = Report("Digits")
    >>> section = report.add_section(trust_section(
    ...     model, BUNDLED_CAM_LAYER, images, denormalize_digits(images), DIGIT_CLASSES, "out",
    ...     labels=labels))
    >>> report.write("out").name                           # out/index.html
    'index.html'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_ext._utils.layers import resolve_layer, root_module

from ._checks import (
    _check_count,
    _check_images,
    _check_names_labels,
    _check_overlay_options,
    _class_names,
    _to_cpu,
    _true_class,
)
from ._figures import save_figure
from .overlay import DEFAULT_CMAP, overlay, save_colorbar, save_png
from .report import (
    _COLORBAR_WIDTH,
    EMPTY_CAPTION,
    Figure,
    Section,
    Table,
    _check_batch_size,
    _display_array,
    _for_figure,
    _layer_name,
    _model_device,
    _predicted_and_runner_up,
    _probabilities,
    _progress_bar,
    is_empty_map,
)

__all__ = ["TrustData", "compute_trust", "render_trust", "trust_section"]

#: the scores every trust section shows (the paper's figure plots one against the other)
_REQUIRED = ("gradtrust", "softmax")
#: width in the page (CSS pixels) of the two plots
_PLOT_WIDTH = 480


def _default_scores(model: Any) -> list[str]:
    """Every score of :data:`~captum_ext.metrics.TRUST_SCORES`; MC-dropout only for a model with
    dropout (it refuses models without)."""
    from captum_ext.metrics import TRUST_SCORES

    module = root_module(model)
    has_dropout = module is not None and any(
        isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules()
    )
    return [name for name in TRUST_SCORES if name != "mc_dropout" or has_dropout]


def _check_scores(scores: Any, model: Any) -> list[str]:
    from captum_ext.metrics import TRUST_SCORES

    if scores is None:
        return _default_scores(model)
    if isinstance(scores, str):
        scores = [s.strip() for s in scores.split(",")]
    names = list(dict.fromkeys(scores))
    unknown = [name for name in names if name not in TRUST_SCORES]
    if unknown:
        raise ValueError(
            f"`scores`: unknown score name(s) {', '.join(map(repr, unknown))}; expected names "
            f"of captum_ext.metrics.TRUST_SCORES: {', '.join(TRUST_SCORES)}."
        )
    return [*_REQUIRED, *(name for name in names if name not in _REQUIRED)]


def _labels_column(labels: list[Any] | None, n: int, num_classes: int) -> Tensor:
    """-1 where the label is unknown, as :class:`~captum_ext.metrics.ScoreTable` has it."""
    names = [str(c) for c in range(num_classes)]
    if labels is None:
        return torch.full((n,), -1, dtype=torch.int64)
    values = [_true_class(labels, i, names) for i in range(n)]
    return torch.tensor([-1 if v is None else v for v in values], dtype=torch.int64)


def _runnable_scores(
    module: nn.Module,
    probe: Tensor,
    names: list[str],
    score_kwargs: Mapping[str, Mapping[str, Any]] | None,
    progress: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The scores that run on this model (tried on ``probe``, two images: with one, a model
    that returns log-probabilities cannot be told from one whose logits happen to have a
    log-sum-exp near 0, so energy and purview would pass here and fail on the whole set)
    and, for the optional ones that do not, the first line of their error, so that the
    section can say so instead of failing as a whole. GradTrust and softmax confidence must
    run. ``progress``: a bar over the scores on stderr (on large images every score takes
    seconds here)."""
    from captum_ext.metrics import TRUST_SCORES

    runnable, failed = [], {}
    description = f"checking which trust scores run (on {probe.shape[0]} images)"
    with _progress_bar(len(names), description, progress, unit="score") as bar:
        for name in names:
            try:
                TRUST_SCORES[name](module, probe, **dict((score_kwargs or {}).get(name, {})))
            except (ValueError, TypeError) as error:
                if name in _REQUIRED:
                    raise
                failed[name] = str(error).strip().splitlines()[0]
            else:
                runnable.append(name)
            bar.update(1)
    return runnable, failed


def _plot_scatter(
    softmax: np.ndarray,
    log_gradtrust: np.ndarray,
    correct: np.ndarray,
    known: np.ndarray,
    path: Path,
) -> Path:
    """GradTrust (given as its natural log, the ``gradtrust`` column of score_dataset) on a
    log axis against softmax confidence. Plotting the log itself, with 10^k tick labels, keeps
    confident models' scores (beyond any float range) on the plot."""
    from matplotlib.figure import Figure as PlotFigure
    from matplotlib.ticker import FuncFormatter

    figure = PlotFigure(figsize=(4.8, 4.0), dpi=100, layout="constrained")
    ax = figure.subplots()
    groups = [
        (known & correct, "tab:green", "correct"),
        (known & ~correct, "tab:red", "wrong"),
        (~known, "tab:gray", "label unknown"),
    ]
    log10_gradtrust = log_gradtrust / np.log(10.0)  # finite also where GradTrust overflows
    for member, colour, name in groups:
        if member.any():
            ax.scatter(
                softmax[member],
                log10_gradtrust[member],
                s=14,
                c=colour,
                alpha=0.7,
                label=f"{name} ({int(member.sum())})",
                edgecolors="none",
            )
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"$10^{{{value:g}}}$"))
    ax.set_xlabel("softmax confidence (max probability)")
    ax.set_ylabel("GradTrust, log scale (higher = more trusted)")
    ax.set_title("GradTrust vs softmax confidence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(figure, path)
    return path


def _format_gradtrust(log_value: float) -> str:
    """GradTrust from its natural log: plain where a float64 holds it, else as 10^x."""
    if not np.isfinite(log_value):
        return "undefined (all gradients vanish)" if np.isnan(log_value) else str(log_value)
    if abs(log_value) < 700:
        return f"{np.exp(log_value):.4g}"
    return f"10^{log_value / np.log(10.0):.1f}"


def _not_rankable(values: Tensor) -> str | None:
    """Why a score column cannot be ranked (NaN or infinite values), or None."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(values).sum())
    return (
        f"{nan} NaN and {int((~finite).sum()) - nan} infinite values of {values.numel()}, "
        "so it is not ranked"
    )


#: fewer wrong (or fewer correct) labelled predictions than this cannot rank the scores: with
#: one wrong prediction every score that puts it lowest reaches AUROC 1 and they all tie
_MIN_PER_OUTCOME = 5

#: why a score can rank below chance, in one sentence, where the reason is known
_BELOW_CHANCE_WHY = {
    "purview": "its penalty grows with the size of the last layer's features, and on these "
    "images the correct predictions have the larger features, so it calls them less trusted.",
}


def _sample_note(n_correct: int, n_wrong: int) -> str | None:
    """A sentence when the labelled images are too few to rank the scores, else None."""
    if min(n_correct, n_wrong) >= _MIN_PER_OUTCOME:
        return None
    fewer = "wrong" if n_wrong <= n_correct else "correct"
    count = min(n_correct, n_wrong)
    why = (
        "any score that sets that one image apart reaches AUROC 1.000 (or 0.000) however it "
        "orders the rest, so scores tie"
        if count == 1
        else "a few images decide every AUROC, so scores tie or swap places by chance"
    )
    return (
        f"Only {count} of the {n_correct + n_wrong} labelled predictions "
        f"{'is' if count == 1 else 'are'} {fewer}: too few to rank the scores ({why}). Label "
        f"more images, with at least {_MIN_PER_OUTCOME} wrong and {_MIN_PER_OUTCOME} correct "
        "predictions."
    )


def _below_chance_note(name: str, auroc: float) -> str:
    why = _BELOW_CHANCE_WHY.get(
        name, "it gives the wrong predictions higher scores than the correct ones on these images."
    )
    return f"{name} ranks below chance here (misprediction AUROC {auroc:.3f} < 0.5): {why}"


def _retention_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]):
    """The accuracy-retention plot, its legend outside the axes (to the right), so that no
    curve hides behind it."""
    from matplotlib.figure import Figure as PlotFigure

    figure = PlotFigure(figsize=(6.6, 4.0), dpi=100, layout="constrained")
    ax = figure.subplots()
    for name, (percentiles, accuracy, area) in sorted(curves.items(), key=lambda kv: -kv[1][2]):
        width = 2.0 if name in _REQUIRED else 1.0
        ax.plot(percentiles, 100 * accuracy, linewidth=width, label=f"{name} (AUAC {area:.2f})")
    ax.set_xlabel("percentile of the score below which images are dropped")
    ax.set_ylabel("accuracy of the kept images (%)")
    ax.set_title("Accuracy retention")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return figure


def _plot_retention(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path) -> Path:
    figure = _retention_figure(curves)
    save_figure(figure, path)
    return path


def trust_section(
    model: Callable,
    layer: Any,
    images: Tensor,
    display_images: Any,
    class_names: Sequence[str] | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    labels: Sequence[Any] | Tensor | None = None,
    scores: Sequence[str] | str | None = None,
    score_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 64,
    names: Sequence[str] | None = None,
    least_trusted: int = 10,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    title: str = "Which predictions can I trust? (GradTrust)",
) -> Section:
    r"""The section "Which predictions can I trust?": GradTrust against the trust baselines.

    Every image is scored with :func:`~captum_ext.metrics.score_dataset` (GradTrust, its
    reference form and the baselines of :data:`~captum_ext.metrics.TRUST_SCORES`; higher = more
    trusted):

    .. code-block:: text

        GradTrust = mean_Q ||p - e_Q||^2 / ||p - e_P||^2    (Q: the 5 next most likely classes)
        accuracy(t) = accuracy of the images whose score is above its t-th percentile
        AUAC = area under accuracy(t), t in [0, 100), in percent

    GradTrust is computed as its natural log (the ``gradtrust`` column of
    :func:`~captum_ext.metrics.score_dataset`), which ranks the images like GradTrust itself
    and stays finite on confident models, where GradTrust exceeds any float range.

    The section has

    - a row with two plots: GradTrust (log axis) against softmax confidence (one dot per
      image, green correct, red wrong, grey label unknown: the figure of the paper), and the
      accuracy-retention curves of every score with their AUAC in the legend (labelled images
      only), with a table of AUAC, AUFC and AUROC of separating correct from wrong
      predictions (AUROC needs both kinds);
    - one row per least-trusted image (lowest GradTrust first): the input, its Grad-CAM
      ("Why P?") and its ContrastCAM against the runner-up class Q ("Why P, rather than
      Q?"), upsampled to the image and scaled to [0, 1].

    An optional score that cannot run on this model (for example MC-dropout on a model
    without dropout, or a gradient score on a model whose parameters are not reachable) is
    left out and the section's introduction says why; GradTrust and softmax confidence are
    required. A score with NaN or infinite values gets "-" in the table (it cannot be
    ranked) and the introduction says how many. The PNGs go to ``out_dir/images/trust/``.

    Paper: Prabhushankar & AlRegib, "Counterfactual Gradients-based Quantification of
    Prediction Trust in Neural Networks", IEEE MIPR 2024.

    Args:
        model (Callable): the classifier (an ``nn.Module`` or a bound method of one),
            returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer of the Grad-CAM and ContrastCAM maps.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        display_images (Tensor or numpy.ndarray): the same images for display, float in
            [0, 1] or uint8 (0..255), N x C x H x W (tensor) or N x H x W x C (array); other
            integer dtypes raise a ``TypeError`` (convert them first).
        class_names (Sequence[str] or None): one name per model output. None: the indices.
        out_dir (str or PathLike): the report folder.
        progress (bool, optional): tqdm progress bar on stderr. Default: True.
        labels (optional): true class per image (indices, or None where unknown). Without
            labels the section shows the scatter plot (grey) and the least-trusted images.
        scores (Sequence[str] or str, optional): names of :data:`~captum_ext.metrics.TRUST_SCORES`
            to compare (comma-separated string accepted); ``"gradtrust"`` and ``"softmax"``
            are always included. Default: all of them (MC-dropout only when the model has
            dropout).
        score_kwargs (Mapping, optional): options per score name, as for
            :func:`~captum_ext.metrics.score_dataset`.
        batch_size (int, optional): images per scoring and attribution call. Default: 64.
        names (Sequence[str], optional): a name per image (e.g. file names). Default: ``#i``.
        least_trusted (int, optional): how many least-trusted images get a row. Default: 10.
        alpha (float, optional): opacity of the heat maps over the images. Default: 0.5.
        cmap (str, optional): matplotlib colour map of the heat maps. Default:
            :data:`~captum_ext.viz.DEFAULT_CMAP` (``"inferno"``); their colour bar is
            shown above the least-trusted images.
        title (str, optional): the section title.

    Returns:
        Section: the rows described above.

    Examples::

        >>> from captum_ext.viz import trust_section
        >>> section = trust_section(model, "features.7", images, shown, DIGIT_CLASSES, "out",
        ...                         labels=labels, least_trusted=5)
        >>> section.rows[0].table.columns
        ['score', 'AUAC (%)', 'AUFC (%)', 'misprediction AUROC']
    """
    images = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    least_trusted = _check_count(least_trusted, "least_trusted")
    _check_scores(scores, model)  # fails before anything runs; compute_trust orders them
    _check_overlay_options(alpha, cmap, "trust_section()")
    n = images.shape[0]
    shown = _display_array(display_images, n, (images.shape[2], images.shape[3]))
    labels = _check_names_labels(names, labels, n)
    data = compute_trust(
        model,
        layer,
        images,
        labels=labels,
        class_names=class_names,
        scores=scores,
        score_kwargs=score_kwargs,
        batch_size=batch_size,
        least_trusted=least_trusted,
        progress=progress,
    )
    return render_trust(
        data,
        shown,
        out_dir,
        names=names,
        alpha=alpha,
        cmap=cmap,
        title=title,
        progress=progress,
    )


@dataclass(frozen=True)
class TrustData:
    r"""What :func:`compute_trust` returns (numbers only; :func:`render_trust` draws them).

    Attributes:
        table (ScoreTable): :func:`~captum_ext.metrics.score_dataset`'s table of every image:
            ``label`` (-1 where unknown), ``prediction``, ``correct`` and one column per
            computed score (``gradtrust`` holds the natural log of GradTrust).
        score_names (list[str]): the computed scores, in the order of the table of metrics
            (``"gradtrust"`` and ``"softmax"`` first).
        failed (dict[str, str]): optional score -> first line of the error that kept it from
            running on this model (left out of ``table``).
        unranked (dict[str, str]): score -> why it cannot be ranked (NaN or infinite values
            among the labelled images); it has no metrics.
        auac (dict[str, float]): score -> :func:`~captum_ext.metrics.auac` on the labelled
            images (ranked scores only; empty without labels).
        aufc (dict[str, float]): score -> :func:`~captum_ext.metrics.aufc` on the labelled
            images.
        auroc (dict[str, float or None]): score ->
            :func:`~captum_ext.metrics.misprediction_auroc` on the labelled images; None
            unless they hold both correct and wrong predictions.
        curves (dict[str, tuple[numpy.ndarray, numpy.ndarray]]): score -> (percentiles,
            accuracy in [0, 1]) of :func:`~captum_ext.metrics.accuracy_retention_curve`.
        least_trusted (Tensor): indices of the least-trusted images, lowest GradTrust first.
        probabilities (Tensor): ``K x C`` softmax of the model on those images (CPU).
        predicted (Tensor): ``K`` predicted classes P of those images.
        runner_up (Tensor): ``K`` runner-up classes Q of those images.
        maps (dict[str, numpy.ndarray]): ``"gradcam"`` (Grad-CAM of P) and ``"contrast"``
            (ContrastCAM of P against Q) -> ``K x H x W`` maps upsampled to the input and
            min-max scaled to [0, 1].
        class_names (list[str]): one name per model output.
        layer_name (str): the layer of the maps ("" when unknown).
        image_size (tuple[int, int]): ``(H, W)`` of the images.
    """

    table: Any
    score_names: list[str]
    failed: dict[str, str]
    unranked: dict[str, str]
    auac: dict[str, float]
    aufc: dict[str, float]
    auroc: dict[str, float | None]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    least_trusted: Tensor
    probabilities: Tensor
    predicted: Tensor
    runner_up: Tensor
    maps: dict[str, np.ndarray]
    class_names: list[str]
    layer_name: str
    image_size: tuple[int, int]

    @property
    def labelled(self) -> Tensor:
        """Boolean mask of the images with a known label."""
        return self.table["label"] >= 0


def compute_trust(
    model: Callable,
    layer: Any,
    images: Tensor,
    *,
    labels: Sequence[Any] | Tensor | None = None,
    class_names: Sequence[str] | None = None,
    scores: Sequence[str] | str | None = None,
    score_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 64,
    least_trusted: int = 10,
    progress: bool = False,
) -> TrustData:
    r"""The numbers of :func:`trust_section`, without drawing: every image scored by GradTrust
    and the trust baselines (:func:`~captum_ext.metrics.score_dataset`), the AUAC, AUFC and
    misprediction AUROC of each score on the labelled images, and the Grad-CAM and
    ContrastCAM maps of the ``least_trusted`` images of lowest GradTrust.

    Args:
        model (Callable): the classifier (an ``nn.Module`` or a bound method of one),
            returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer of the Grad-CAM and ContrastCAM maps.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        labels (optional): true class per image (indices, or None where unknown).
        class_names (Sequence[str], optional): one name per model output. None: the indices.
        scores (Sequence[str] or str, optional): names of
            :data:`~captum_ext.metrics.TRUST_SCORES`, as for :func:`trust_section`.
        score_kwargs (Mapping, optional): options per score name, as for
            :func:`~captum_ext.metrics.score_dataset`; ``mc_dropout`` gets
            ``generator=0`` unless given, so that the numbers do not depend on what the
            process drew before (the global random state is left as it was).
        batch_size (int, optional): images per scoring call. Default: 64.
        least_trusted (int, optional): how many least-trusted images get maps. Default: 10.
        progress (bool, optional): tqdm progress bar on stderr. Default: False.

    Returns:
        :class:`TrustData`.

    Examples::

        >>> from captum_ext.viz import compute_trust
        >>> data = compute_trust(model, "features.7", images, labels=labels, least_trusted=3)
        >>> data.least_trusted.shape, data.maps["contrast"].shape
        (torch.Size([3]), (3, 28, 28))
    """
    from torch.utils.data import DataLoader, TensorDataset

    from captum_ext.attr import ContrastCAM, GradCAM
    from captum_ext.metrics import (
        accuracy_retention_curve,
        auac,
        aufc,
        misprediction_auroc,
        score_dataset,
    )

    images = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    least_trusted = _check_count(least_trusted, "least_trusted")
    score_names = _check_scores(scores, model)
    n = images.shape[0]
    labels = _check_names_labels(None, labels, n)
    module = resolve_layer(model, layer)
    layer_name = _layer_name(model, layer, module)
    device = _model_device(model, images)

    num_classes = _probabilities(model, images[:1].to(device)).shape[1]
    class_names = _class_names(class_names, num_classes)
    label_column = _labels_column(labels, n, num_classes)
    owner = root_module(model)
    if owner is None:
        raise TypeError("trust_section needs `model` to be an nn.Module or a bound method of one.")
    # a seeded mc_dropout: a report does not depend on what the process drew before it
    score_kwargs = dict(score_kwargs or {})
    score_kwargs["mc_dropout"] = {"generator": 0, **score_kwargs.get("mc_dropout", {})}

    def scored(names: list[str]) -> Any:
        return score_dataset(
            owner,
            # its own generator: iterating a loader draws a base seed from the global one
            DataLoader(
                TensorDataset(images, label_column),
                batch_size=batch_size,
                generator=torch.Generator(),
            ),
            names,
            device=device,
            progress=progress,
            score_kwargs={k: v for k, v in score_kwargs.items() if k in names},
        )

    runnable, failed = score_names, {}
    try:
        table = scored(runnable)
    except (ValueError, TypeError):
        # an optional score that cannot run on this model (tried only now: on large images
        # trying every score first took a third of the section): leave it out, say why
        runnable, failed = _runnable_scores(
            owner, images[:2].to(device), score_names, score_kwargs, progress
        )
        if not failed:  # not a score's failure: the error as it is
            raise
        table = scored(runnable)

    unranked: dict[str, str] = {}
    areas: dict[str, float] = {}
    aufcs: dict[str, float] = {}
    aurocs: dict[str, float | None] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    labelled = table["label"] >= 0
    if labelled.any():
        kept_correct = table["correct"][labelled]
        kept_pred, kept_true = table["prediction"][labelled], table["label"][labelled]
        both_kinds = bool(kept_correct.any()) and bool((~kept_correct).any())
        for name in runnable:
            values = table[name][labelled].double()
            reason = _not_rankable(values)
            if reason is not None:
                unranked[name] = reason
                continue
            curve = accuracy_retention_curve(values, kept_correct)
            curves[name] = (curve.percentiles.numpy(), curve.accuracy.double().numpy())
            areas[name] = auac(values, kept_correct)
            aufcs[name] = aufc(values, kept_pred, kept_true)
            aurocs[name] = misprediction_auroc(values, kept_correct) if both_kinds else None

    order = torch.argsort(table["gradtrust"].double(), stable=True)[:least_trusted]
    size = (int(images.shape[2]), int(images.shape[3]))
    if order.numel():
        x = images[order.tolist()].to(device)
        probabilities, predicted, runner_up = _predicted_and_runner_up(model, x)
        grad_cam = GradCAM(model, module).attribute(
            x, target=predicted, upsample_to_input=True, normalize="minmax"
        )
        contrast = ContrastCAM(model, module).attribute(
            x, contrast=runner_up, upsample_to_input=True, normalize="minmax"
        )
        maps = {
            "gradcam": _to_cpu(grad_cam)[:, 0].numpy(),
            "contrast": _to_cpu(contrast)[:, 0].numpy(),
        }
        probabilities = probabilities.detach().cpu()
        predicted, runner_up = predicted.cpu(), runner_up.cpu()
    else:
        probabilities = torch.zeros(0, num_classes)
        predicted = runner_up = torch.zeros(0, dtype=torch.int64)
        maps = {kind: np.zeros((0, *size), dtype=np.float32) for kind in ("gradcam", "contrast")}
    return TrustData(
        table=table,
        score_names=list(runnable),
        failed=failed,
        unranked=unranked,
        auac=areas,
        aufc=aufcs,
        auroc=aurocs,
        curves=curves,
        least_trusted=order,
        probabilities=probabilities,
        predicted=predicted,
        runner_up=runner_up,
        maps=maps,
        class_names=class_names,
        layer_name=layer_name,
        image_size=size,
    )


def render_trust(
    data: TrustData,
    display_images: Any,
    out_dir: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    title: str = "Which predictions can I trust? (GradTrust)",
    progress: bool = False,
) -> Section:
    """Draw :func:`compute_trust`'s numbers into ``out_dir/images/trust/`` and return the
    Section of :func:`trust_section`: the scatter and accuracy-retention plots with the table
    of metrics, then the least-trusted images (from ``display_images``, N x H x W x C in
    [0, 1] or an N x C x H x W tensor) with their maps, drawn shrunk to at most
    ``FIGURE_PIXELS`` on their longer side when they are larger.
    ``progress``: a bar on stderr while those are drawn. Default: False."""
    _check_overlay_options(alpha, cmap, "render_trust()")
    table = data.table
    n = len(table)
    shown = _display_array(display_images, n, data.image_size)
    if names is not None and len(names) != n:
        raise ValueError(f"`names` has {len(names)} entries for {n} images.")
    class_names = data.class_names
    folder = Path(out_dir) / "images" / "trust"
    folder.mkdir(parents=True, exist_ok=True)

    labelled = data.labelled
    known = labelled.numpy()
    scatter = _plot_scatter(
        table["softmax"].double().numpy(),
        table["gradtrust"].double().numpy(),
        table["correct"].numpy(),
        known,
        folder / "gradtrust_vs_softmax.png",
    )
    figures = [Figure("GradTrust vs softmax confidence", scatter, _PLOT_WIDTH)]
    metrics_table = None
    notes: list[str] = []
    accuracy_text = ""
    if labelled.any():
        metrics_table = Table(
            ["score", "AUAC (%)", "AUFC (%)", "misprediction AUROC"],
            caption="Misprediction detection on the labelled images (higher is better)",
        )
        kept_correct = table["correct"][labelled]
        n_correct = int(kept_correct.sum())
        small = _sample_note(n_correct, int(kept_correct.numel()) - n_correct)
        if small is not None:
            notes.append(small)
            metrics_table.caption += " (the labelled sample is too small to rank the scores)"
        for name in data.score_names:
            if name in data.unranked:
                metrics_table.add_row([name, "-", "-", "-"])
                continue
            auroc = data.auroc[name]
            if auroc is not None and auroc < 0.5:
                notes.append(_below_chance_note(name, auroc))
            metrics_table.add_row(
                [
                    name,
                    f"{data.auac[name]:.2f}",
                    f"{data.aufc[name]:.2f}",
                    f"{auroc:.3f}" if auroc is not None else "-",
                ]
            )
        curves = {
            name: (percentiles, accuracy, data.auac[name])
            for name, (percentiles, accuracy) in data.curves.items()
        }
        retention = _plot_retention(curves, folder / "accuracy_retention.png")
        figures.append(
            Figure("Accuracy retention curves (AUAC in the legend)", retention, _PLOT_WIDTH)
        )
        accuracy_text = (
            f" Accuracy on the {int(labelled.sum())} labelled images: "
            f"{100 * float(kept_correct.double().mean()):.1f}%."
        )

    skipped = "".join(f"\n{note}" for note in notes)
    skipped += "".join(
        f"\nNot computed: {name} ({reason})." for name, reason in data.failed.items()
    )
    skipped += "".join(
        f"\nNot ranked: {name} ({reason})." for name, reason in data.unranked.items()
    )
    explained_at = f" at layer {data.layer_name}" if data.layer_name else ""
    section = Section(
        title,
        intro=(
            "GradTrust asks how much the last layer's weights would have to change for the "
            "model to predict another class: the larger that change compared with the change "
            "for the prediction itself, the more the prediction can be trusted. Higher scores "
            "mean more trusted, for every score. The accuracy-retention curve keeps the images "
            "above each percentile of a score: a good trust score drops the wrong predictions "
            f"first, so its curve (and its AUAC) rises above the plain accuracy.{accuracy_text}"
            f"\nThe least-trusted images are shown with their Grad-CAM{explained_at} ('Why "
            "P?') and their ContrastCAM against the runner-up class Q ('Why P, rather than "
            "Q?'); a map with no evidence at all (every value 0) is marked 'empty'."
            f"{skipped}"
        ),
    )
    section.add_row("Trust scores", figures, table=metrics_table)

    chosen = data.least_trusted.tolist()
    if not chosen:
        return section
    colour_bar = save_colorbar(
        folder / "colorbar.png",
        cmap=cmap,
        alpha=alpha,
        label="each map scaled to [0, 1] (as overlaid on the images)",
    )
    section.add_row(
        "Colour scale", [Figure("Colour scale of the maps", colour_bar, _COLORBAR_WIDTH)]
    )
    with _progress_bar(len(chosen), "drawing trust figures", progress) as bar:
        for rank, i in enumerate(chosen):
            p, q = int(data.predicted[rank]), int(data.runner_up[rank])
            name_p, name_q = class_names[p], class_names[q]
            stem = folder / f"least_trusted_{rank:03d}_{i:05d}"
            image, grad_cam, contrast = _for_figure(
                shown[i], data.maps["gradcam"][rank], data.maps["contrast"][rank]
            )
            row_figures = [("Input", save_png(image, f"{stem}_input.png"))]
            for kind, heat, caption in (
                ("gradcam", grad_cam, f"Grad-CAM: Why {name_p}?"),
                ("contrast", contrast, f"ContrastCAM: Why {name_p}, rather than {name_q}?"),
            ):
                if is_empty_map(data.maps[kind][rank]):  # the map itself, not its picture
                    caption += EMPTY_CAPTION
                picture = overlay(image, heat, alpha=alpha, cmap=cmap)
                row_figures.append((caption, save_png(picture, f"{stem}_{kind}.png")))
            image_name = str(names[i]) if names is not None else f"#{i}"
            label = (
                f"{rank + 1}. {image_name}: "
                f"GradTrust {_format_gradtrust(float(table['gradtrust'][i]))}, "
                f"predicted {name_p} ({float(data.probabilities[rank, p]):.1%}), runner-up "
                f"{name_q} ({float(data.probabilities[rank, q]):.1%})"
            )
            true = int(table["label"][i])
            if true >= 0:
                verdict = "correct" if true == p else "wrong"
                label += f"; true class {class_names[true]} ({verdict})"
            section.add_row(label, row_figures)
            bar.update(1)
    return section
