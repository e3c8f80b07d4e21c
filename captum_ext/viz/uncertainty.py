r"""Report sections on how far an explanation can be trusted.

- :func:`voice_section`: "How uncertain is this explanation?" The Grad-CAM explanation of
  each prediction, its contrast against the runner-up class and its VOICE uncertainty map,
  with the VOICE read-outs (IoU, SNR, log-likelihood).
- :func:`explanation_metrics_section`: "Does the explanation point at what the model uses?"
  Pixel-wise deletion and insertion AUCs of Grad-CAM, ContrastCAM and CounterfactualCAM, with
  a plot of the mean curves.

Both follow :func:`~captum_ext.viz.contrastive_section`: they compute in batches on the
model's device, write their PNGs under ``out_dir/images/<section>/`` and return a
:class:`~captum_ext.viz.Section` for :class:`~captum_ext.viz.Report`. Each is two steps that
can be called on their own: :func:`compute_voice` / :func:`compute_explanation_metrics`
return the numbers (:class:`VoiceData` / :class:`ExplanationMetricsData`; no drawing, no
files) and :func:`render_voice` / :func:`render_explanation_metrics` draw them into a
:class:`~captum_ext.viz.Section`.

Example::

    >>> from captum_ext.bundled import load_bundled_model
    >>> from captum_ext.data import (BUNDLED_CAM_LAYER, DIGIT_CLASSES, denormalize_digits,
    ...                              load_sample_digits)
    >>> from captum_ext.viz import Report, explanation_metrics_section, voice_section
    >>> model = load_bundled_model()
    >>> images, labels = load_sample_digits()
    >>> images, labels = images[:8], labels[:8]            # 8 digits keep the example quick
    >>> shown = denormalize_digits(images)
    >>> report = Report("Digits")
    >>> voice = report.add_section(voice_section(model, BUNDLED_CAM_LAYER, images, shown,
    ...                                          DIGIT_CLASSES, "out", labels=labels))
    >>> metrics = report.add_section(explanation_metrics_section(
    ...     model, BUNDLED_CAM_LAYER, images, shown, DIGIT_CLASSES, "out"))
    >>> report.write("out").name
    'index.html'
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from captum_ext._utils.layers import resolve_layer

from ._checks import (
    _check_images,
    _check_names_labels,
    _check_overlay_options,
    _class_names,
    _image_name,
    _row_label,
    _to_cpu,
    _true_class,
)
from ._figures import new_figure, save_figure
from .overlay import (
    DEFAULT_CMAP,
    _check_alpha,
    overlay,
    save_colorbar,
    save_png,
    to_uint8_rgb,
)
from .report import (
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
    empty_maps,
    is_empty_map,
)

__all__ = [
    "ExplanationMetricsData",
    "VoiceData",
    "compute_explanation_metrics",
    "compute_voice",
    "explanation_metrics_section",
    "render_explanation_metrics",
    "render_voice",
    "voice_section",
]

#: width in the page (CSS pixels) of the plot of the mean curves
_PLOT_WIDTH = 720
#: fraction of the pixels shown as "deleted first" in the example rows of the metrics section
_EXAMPLE_FRACTION = 0.2


# --------------------------------------------------------------------------------------
# VOICE


def _check_contrasts(contrasts: Any) -> str | int:
    if contrasts == "all" and isinstance(contrasts, str):
        return contrasts
    if isinstance(contrasts, bool) or not isinstance(contrasts, int) or contrasts < 1:
        raise ValueError(
            f"`contrasts` (--voice-contrasts) must be 'all' or a positive int k (the k most "
            f"likely classes after the prediction), got {contrasts!r}."
        )
    return contrasts


#: width in the page (CSS pixels) of a section's colour bar
_COLORBAR_WIDTH = 320


def _colour_words(cmap: str) -> str:
    """How to read the colours of ``cmap`` in one phrase, pointing at the colour bar."""
    words = {
        "inferno": "black and purple: low, orange and yellow: high",
        "magma": "black and purple: low, pink and white: high",
        "viridis": "purple: low, green and yellow: high",
        "jet": "blue: low, red: high",
    }.get(cmap)
    return f"{words}; see the colour bar" if words else "see the colour bar"


def _format_ll(value: float) -> str:
    return f"{value:.4g}"


def voice_section(
    model: Callable,
    layer: Any,
    images: Tensor,
    display_images: Any,
    class_names: Sequence[str] | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    contrasts: str | int = "all",
    batch_size: int = 64,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    threshold: float = 0.1,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    title: str = "How uncertain is the explanation? (VOICE)",
) -> Section:
    r"""The section "How uncertain is this explanation?": VOICE on Grad-CAM, per image.

    :class:`~captum_ext.attr.VOICE` wraps :class:`~captum_ext.attr.GradCAM` at ``layer``
    and, for each image with prediction P and runner-up Q2, gives

    .. code-block:: text

        explanation  = Grad-CAM of P                            ("Why P?")
        contrast     = ContrastCAM against Q2                   ("Why P, rather than Q2?")
        uncertainty  = minmax( Var_Q ContrastCAM_Q )            (Q over the contrasts != P)
        IoU          = IoU(explanation > threshold, uncertainty > threshold)
        SNR          = mean(uncertainty) / std(uncertainty)
        log-likelihood = log softmax(logits)[P]

    each map upsampled to the image and scaled to [0, 1]. A high IoU means the explanation
    is uncertain about the very pixels it attributes P to: the explanation deserves less
    trust. The row of each image shows the input and the three maps over it; the caption of
    the uncertainty map gives IoU, SNR and log-likelihood (as VOICE returns them). A first
    row holds a table of the mean read-outs over all images, and over the correctly and
    wrongly classified ones where ``labels`` are known.

    VOICE runs on ``batch_size`` images at a time (one forward pass and one batched backward
    for all contrasts of a batch); the PNGs go to ``out_dir/images/voice/``.

    Paper: Prabhushankar & AlRegib, "VOICE: Variance of Induced Contrastive Explanations to
    Quantify Uncertainty in Neural Network Interpretability", IEEE JSTSP 2024.

    Args:
        model (Callable): the classifier (``nn.Module``), returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        display_images (Tensor or numpy.ndarray): the same images for display, float in
            [0, 1] or uint8 (0..255), N x C x H x W (tensor) or N x H x W x C (array); other
            integer dtypes raise a ``TypeError`` (convert them first).
        class_names (Sequence[str] or None): one name per model output. None: the indices.
        out_dir (str or PathLike): the report folder.
        progress (bool, optional): tqdm progress bar on stderr. Default: True.
        contrasts (str or int, optional): the contrast classes of the variance: ``"all"``
            (every class but P, as in the paper) or an int k, the k most likely classes
            after P. Default: "all".
        batch_size (int, optional): images per VOICE call. Default: 64.
        labels (optional): true class per image (indices, or None where unknown), shown in
            the row label and used to split the summary. Default: None.
        names (Sequence[str], optional): a name per image (e.g. file names). Default: ``#i``.
        threshold (float, optional): threshold of the IoU read-out. Default: 0.1.
        alpha (float, optional): heat-map opacity in the overlays. Default: 0.5.
        cmap (str, optional): matplotlib colormap of the overlays; the section shows its
            colour bar beside the summary. Default: ``"inferno"`` (perceptually uniform).
        title (str, optional): the section title.

    Returns:
        Section: a summary row (a table) and one row per image with four figures (input,
        explanation, contrast, uncertainty).

    Examples::

        >>> from captum_ext.viz import voice_section
        >>> section = voice_section(model, "features.7", images, shown, DIGIT_CLASSES, "out",
        ...                         contrasts=3, labels=labels)
        >>> section.rows[1].figures[3].caption  # doctest: +ELLIPSIS
        'Uncertainty (VOICE, 3 contrasts): IoU 0.31..., SNR 0.58..., log-likelihood -0.0012...'
    """
    images = _check_images(images)
    contrasts = _check_contrasts(contrasts)
    batch_size = _check_batch_size(batch_size)
    _check_overlay_options(alpha, cmap, "voice_section()")
    n = images.shape[0]
    shown = _display_array(display_images, n, (images.shape[2], images.shape[3]))
    labels = _check_names_labels(names, labels, n)
    data = compute_voice(
        model,
        layer,
        images,
        class_names=class_names,
        contrasts=contrasts,
        threshold=threshold,
        batch_size=batch_size,
        progress=progress,
    )
    return render_voice(
        data,
        shown,
        out_dir,
        labels=labels,
        names=names,
        alpha=alpha,
        cmap=cmap,
        title=title,
        progress=progress,
    )


@dataclass(frozen=True)
class VoiceData:
    r"""What :func:`compute_voice` returns (numbers only; :func:`render_voice` draws them).

    One entry per image, in the order of the images; every tensor and array is on the CPU.

    Attributes:
        probabilities (Tensor): ``N x C`` softmax of the model's outputs.
        prediction (Tensor): ``N`` predicted classes P (as :class:`~captum_ext.attr.VOICE`
            returns them).
        contrast_class (Tensor): ``N`` runner-up classes Q of the contrast maps.
        explanation (numpy.ndarray): ``N x H x W`` Grad-CAM of P, upsampled to the input and
            scaled to [0, 1].
        contrast (numpy.ndarray): ``N x H x W`` ContrastCAM of P against Q, likewise.
        uncertainty (numpy.ndarray): ``N x H x W`` VOICE uncertainty map, likewise.
        iou (numpy.ndarray): ``N`` IoU of ``explanation > threshold`` and
            ``uncertainty > threshold``.
        snr (numpy.ndarray): ``N`` mean / std of the uncertainty map.
        log_likelihood (numpy.ndarray): ``N`` log-probability of P.
        n_contrasts (numpy.ndarray): ``N`` number of contrast classes in the variance.
        contrasts (str or int): the ``contrasts`` setting (``"all"`` or k).
        threshold (float): the threshold of the IoU.
        class_names (list[str]): one name per model output.
        layer_name (str): the layer explained ("" when unknown).
    """

    probabilities: Tensor
    prediction: Tensor
    contrast_class: Tensor
    explanation: np.ndarray
    contrast: np.ndarray
    uncertainty: np.ndarray
    iou: np.ndarray
    snr: np.ndarray
    log_likelihood: np.ndarray
    n_contrasts: np.ndarray
    contrasts: str | int
    threshold: float
    class_names: list[str]
    layer_name: str


def compute_voice(
    model: Callable,
    layer: Any,
    images: Tensor,
    *,
    class_names: Sequence[str] | None = None,
    contrasts: str | int = "all",
    threshold: float = 0.1,
    batch_size: int = 64,
    progress: bool = False,
) -> VoiceData:
    r"""The numbers of :func:`voice_section`, without drawing or writing files:
    :class:`~captum_ext.attr.VOICE` on :class:`~captum_ext.attr.GradCAM` at ``layer`` for
    every image, ``batch_size`` images per call, on the model's device.

    Args:
        model (Callable): the classifier, returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        class_names (Sequence[str], optional): one name per output. None: the indices.
        contrasts (str or int, optional): ``"all"`` or k, as in :func:`voice_section`.
            Default: "all".
        threshold (float, optional): threshold of the IoU read-out. Default: 0.1.
        batch_size (int, optional): images per VOICE call. Default: 64.
        progress (bool, optional): progress bar on stderr. Default: False.

    Returns:
        :class:`VoiceData`: ``iou``, ``snr`` and ``log_likelihood`` are VOICE's read-outs
        (:class:`~captum_ext.attr.VOICE`'s ``attribute`` on the same images gives the same
        values).

    Examples::

        >>> from captum_ext.viz import compute_voice
        >>> data = compute_voice(model, "features.7", x, contrasts=3)
        >>> data.uncertainty.shape, data.iou.shape
        ((4, 28, 28), (4,))
    """
    from captum_ext.attr import VOICE, GradCAM

    images = _check_images(images)
    contrasts = _check_contrasts(contrasts)
    batch_size = _check_batch_size(batch_size)
    n = images.shape[0]
    module = resolve_layer(model, layer)
    layer_name = _layer_name(model, layer, module)
    device = _model_device(model, images)
    voice = VOICE(GradCAM(model, module))
    names: list[str] = []
    chunks: dict[str, list[Any]] = {
        k: []
        for k in (
            "probabilities",
            "prediction",
            "contrast_class",
            "explanation",
            "contrast",
            "uncertainty",
            "iou",
            "snr",
            "log_likelihood",
            "n_contrasts",
        )
    }
    with _progress_bar(n, "VOICE uncertainty", progress) as bar:
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device)
            probabilities = _probabilities(model, x)
            num_classes = probabilities.shape[1]
            names = _class_names(class_names, num_classes)
            if isinstance(contrasts, int) and contrasts > num_classes - 1:
                raise ValueError(
                    f"`contrasts` (--voice-contrasts) = {contrasts}, but a model with "
                    f"{num_classes} classes has at most {num_classes - 1} contrasts."
                )
            with warnings.catch_warnings():
                # a two-class model's empty maps are explained in the section's text
                warnings.filterwarnings("ignore", message="VOICE: every example has fewer")
                result = voice.attribute(x, contrasts=contrasts, threshold=threshold)
            chunks["probabilities"].append(probabilities.detach().to("cpu"))
            for key in ("prediction", "contrast_class", "n_contrasts"):
                chunks[key].append(torch.as_tensor(getattr(result, key)).detach().to("cpu"))
            for key in ("explanation", "contrast", "uncertainty"):
                chunks[key].append(_to_cpu(getattr(result, key))[:, 0].numpy())
            for key in ("iou", "snr", "log_likelihood"):
                values = torch.as_tensor(getattr(result, key)).detach().to("cpu")
                chunks[key].append(values.double().numpy())
            bar.update(x.shape[0])
    return VoiceData(
        probabilities=torch.cat(chunks["probabilities"]),
        prediction=torch.cat(chunks["prediction"]).long(),
        contrast_class=torch.cat(chunks["contrast_class"]).long(),
        explanation=np.concatenate(chunks["explanation"]),
        contrast=np.concatenate(chunks["contrast"]),
        uncertainty=np.concatenate(chunks["uncertainty"]),
        iou=np.concatenate(chunks["iou"]),
        snr=np.concatenate(chunks["snr"]),
        log_likelihood=np.concatenate(chunks["log_likelihood"]),
        n_contrasts=torch.cat(chunks["n_contrasts"]).long().numpy(),
        contrasts=contrasts,
        threshold=float(threshold),
        class_names=names,
        layer_name=layer_name,
    )


def render_voice(
    data: VoiceData,
    display_images: Any,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = DEFAULT_CMAP,
    title: str = "How uncertain is the explanation? (VOICE)",
    progress: bool = False,
) -> Section:
    r"""Draw :func:`compute_voice`'s maps over ``display_images`` (the images in [0, 1],
    N x C x H x W tensor or N x H x W x C array) into ``out_dir/images/voice/`` and return
    the section of :func:`voice_section`: a summary row (mean read-outs over all images and,
    where ``labels`` are known, over the correctly and wrongly classified ones, beside the
    colour bar) and one row per image (input, explanation, contrast, uncertainty).

    Args:
        data (VoiceData): what :func:`compute_voice` returned.
        display_images (Tensor or numpy.ndarray): the images in [0, 1] for display.
        out_dir (str or PathLike): the report folder.
        labels (optional): true class per image (indices, or None where unknown).
        names (Sequence[str], optional): a name per image. Default: ``#i``.
        alpha (float, optional): heat-map opacity. Default: 0.5.
        cmap (str, optional): matplotlib colormap of the overlays. Default: ``"inferno"``.
        title (str, optional): the section title.
        progress (bool, optional): a bar on stderr while the figures are drawn. Default:
            False.

    Images larger than the page shows them are drawn shrunk to at most
    ``FIGURE_PIXELS`` on their longer side.

    Returns:
        Section: as :func:`voice_section`.
    """
    _check_overlay_options(alpha, cmap, "render_voice()")
    n = data.prediction.shape[0]
    size = data.uncertainty.shape[1:]
    shown = _display_array(display_images, n, (size[0], size[1]))
    labels = _check_names_labels(names, labels, n)
    class_names = data.class_names
    folder = Path(out_dir) / "images" / "voice"
    folder.mkdir(parents=True, exist_ok=True)
    maps = {
        "explanation": data.explanation,
        "contrast": data.contrast,
        "uncertainty": data.uncertainty,
    }
    rows: list[tuple[str, list[tuple[str, Path]]]] = []
    correct: list[bool | None] = []
    with _progress_bar(n, "drawing VOICE figures", progress) as progress_shown:
        for i in range(n):
            p, q = int(data.prediction[i]), int(data.contrast_class[i])
            name_p, name_q = class_names[p], class_names[q]
            true = _true_class(labels, i, class_names)
            correct.append(None if true is None else true == p)
            iou, snr, ll = float(data.iou[i]), float(data.snr[i]), float(data.log_likelihood[i])
            stem = folder / f"{i:05d}"
            image, *heats = _for_figure(shown[i], *(maps[kind][i] for kind in maps))
            figures = [("Input", save_png(image, f"{stem}_input.png"))]
            captions = {
                "explanation": f"Explanation (Grad-CAM): Why {name_p}?",
                "contrast": f"Contrast: Why {name_p}, rather than {name_q}?",
                "uncertainty": (
                    f"Uncertainty (VOICE, {int(data.n_contrasts[i])} contrasts): IoU "
                    f"{iou:.3f}, SNR {snr:.3f}, log-likelihood {_format_ll(ll)}"
                ),
            }
            for (kind, caption), heat in zip(captions.items(), heats, strict=True):
                if is_empty_map(maps[kind][i]):  # the map itself, not its shrunk picture
                    caption += EMPTY_CAPTION
                picture = overlay(image, heat, alpha=alpha, cmap=cmap)
                figures.append((caption, save_png(picture, f"{stem}_{kind}.png")))
            label = _row_label(
                _image_name(names, i), data.probabilities[i], p, q, true, class_names
            )
            rows.append((label, figures))
            progress_shown.update(1)

    if data.contrasts == "all":
        which = "every other class"
    else:
        which = f"the {data.contrasts} most likely classes after P"
    explained_at = f" at layer {data.layer_name}" if data.layer_name else ""
    section = Section(
        title,
        intro=(
            f"VOICE (variance of induced contrastive explanations) measures how uncertain an "
            f"explanation is. For each image: the Grad-CAM explanation{explained_at} of the "
            "prediction P ('Why P?'), the contrastive explanation against the runner-up class "
            "Q ('Why P, rather than Q?'), and the uncertainty map: the variance of the "
            f"contrastive explanations against {which} (Q != P), each map upsampled to the "
            f"image and scaled to [0, 1] ({_colour_words(cmap)}).\n"
            f"IoU: overlap of the explanation and the uncertainty, both thresholded at "
            f"{data.threshold:g}. A higher IoU means the explanation is uncertain about the "
            "very pixels it attributes the prediction to: it deserves less trust. "
            "SNR: mean / std of the uncertainty map; higher means more dispersed uncertainty. "
            "Log-likelihood: log-probability of P (0 is certain)."
            + (
                "\nThe model has two classes, so every image has a single contrast class: "
                "the variance of one map is 0, the uncertainty maps are empty and IoU and SNR "
                "are 0. VOICE needs three classes or more."
                if n and int(data.n_contrasts.max()) <= 1
                else ""
            )
        ),
    )
    summary = Table(
        ["images", "count", "mean IoU", "mean SNR", "mean log-likelihood"],
        caption="Mean VOICE read-outs (IoU: higher = explanation less trustworthy)",
    )
    groups = [("all", [True] * n)]
    if any(c is not None for c in correct):
        groups.append(("correctly classified", [c is True for c in correct]))
        groups.append(("wrongly classified", [c is False for c in correct]))
    for group, member in groups:
        chosen = np.flatnonzero(member)
        if chosen.size == 0:
            summary.add_row([group, 0, "-", "-", "-"])
            continue
        summary.add_row(
            [
                group,
                chosen.size,
                f"{np.mean(data.iou[chosen]):.3f}",
                f"{np.mean(data.snr[chosen]):.3f}",
                _format_ll(float(np.mean(data.log_likelihood[chosen]))),
            ]
        )
    bar = save_colorbar(
        folder / "colorbar.png",
        cmap=cmap,
        alpha=alpha,
        label="each map scaled to [0, 1] (as overlaid on the images)",
    )
    section.add_row(
        "Summary", [Figure("Colour scale of the maps", bar, _COLORBAR_WIDTH)], table=summary
    )
    for label, figures in rows:
        section.add_row(label, figures)
    return section


# --------------------------------------------------------------------------------------
# deletion / insertion


_METHODS = ("gradcam", "contrast", "counterfactual")
_METHOD_NAMES = {
    "gradcam": "Grad-CAM",
    "contrast": "ContrastCAM",
    "counterfactual": "CounterfactualCAM",
}
_QUESTIONS = {
    "gradcam": "Why P?",
    "contrast": "Why P, rather than Q?",
    "counterfactual": "What if not P?",
}
_COLOURS = {"gradcam": "tab:red", "contrast": "tab:blue", "counterfactual": "tab:green"}
_METRICS = ("deletion", "insertion")
#: an AUC of an empty map (``empty_maps``) in the tables
_EMPTY_CELL = "n/a (empty)"


def _mean_cell(mean: float, scored: np.ndarray) -> str:
    """A mean AUC of the metrics table: over the images whose map is not empty, saying how
    many were left out; n/a when every map is empty."""
    left_out = int((~scored).sum())
    if left_out == scored.size:
        return "n/a (every map empty)"
    text = f"{mean:.3f}"
    return text + (f" ({left_out} empty left out)" if left_out else "")


def _first_pixels(heat: np.ndarray, fraction: float) -> np.ndarray:
    """The mask of the pixels deletion removes first (decreasing value, ties by index)."""
    flat = heat.reshape(-1)
    count = int(round(fraction * flat.size))
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=np.float64)
    mask[order[:count]] = 1.0
    return mask.reshape(heat.shape)


def _mark(image: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """The image with the pixels of ``mask`` tinted red (opacity ``alpha``): a pixel of mask
    value 1 fully, one of a shrunk mask (the share of it that is marked) in proportion."""
    alpha = _check_alpha(alpha)
    rgb = to_uint8_rgb(image, "display_images").astype(np.float64) / 255.0
    red = np.array([1.0, 0.0, 0.0])
    weight = alpha * np.clip(np.asarray(mask, dtype=np.float64), 0.0, 1.0)[:, :, None]
    return (1.0 - weight) * rgb + weight * red


def _plot_curves(
    fractions: np.ndarray,
    curves: dict[str, dict[str, np.ndarray]],
    mean_auc: dict[str, dict[str, float]],
    scored: dict[str, np.ndarray],
    n: int,
    path: Path,
) -> Path:
    """The mean deletion and insertion curves of each method over the images whose map of it
    is not empty (``scored``: method -> ``N`` bools); a method whose maps are all empty has
    no curve."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "explanation_metrics_section() needs matplotlib: pip install 'captum-ext[viz]'"
        ) from None
    figure = new_figure(900, 360)
    axes = figure.subplots(1, 2, sharey=True)
    better = {"deletion": "lower AUC is better", "insertion": "higher AUC is better"}
    for ax, metric in zip(axes, ("deletion", "insertion")):
        for method in _METHODS:
            kept = scored[method]
            if not kept.any():  # every map empty: nothing to draw
                continue
            ax.plot(
                fractions,
                curves[metric][method][kept].mean(0),
                color=_COLOURS[method],
                label=f"{_METHOD_NAMES[method]} (AUC {mean_auc[metric][method]:.3f})",
            )
        ax.set_title(f"{metric.capitalize()} ({better[metric]})")
        ax.set_xlabel(f"fraction of pixels {'removed' if metric == 'deletion' else 'inserted'}")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_lines():  # none when every map of every method is empty
            ax.legend(fontsize=8, loc="upper right" if metric == "deletion" else "lower right")
    axes[0].set_ylabel(f"mean probability of P ({n} images)")
    save_figure(figure, path)
    return path


def explanation_metrics_section(
    model: Callable,
    layer: Any,
    images: Tensor,
    display_images: Any,
    class_names: Sequence[str] | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    n_steps: int = 50,
    baselines: Any = 0.0,
    batch_size: int = 64,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    examples: int = 1,
    alpha: float = 0.6,
    title: str = "Do the maps point at what the model uses? (deletion and insertion)",
) -> Section:
    r"""The section "Deletion and insertion" comparing Grad-CAM, ContrastCAM, CounterfactualCAM.

    For each image with prediction P and runner-up Q, the three maps of
    :func:`~captum_ext.viz.contrastive_section` (Grad-CAM of P, ContrastCAM against Q,
    CounterfactualCAM of P, each upsampled to the input and min-max normalised) are scored
    with :func:`~captum_ext.metrics.deletion` and :func:`~captum_ext.metrics.insertion`,
    following P:

    .. code-block:: text

        deletion AUC  = area under p(P | x with its top-ranked pixels replaced by baseline)
        insertion AUC = area under p(P | baseline with the top-ranked pixels of x put back)

    both against the fraction of pixels perturbed, 0 to 1 in ``n_steps`` steps. A low
    deletion AUC (the probability falls fast: the map found pixels the model needs) and a
    high insertion AUC (it rises fast: they suffice) are better. CounterfactualCAM ranks the
    evidence *against* P first, so it is expected to do badly here: it is the reference of
    a map that points elsewhere.

    The section has a row with a plot of the mean curves of the three methods (a PNG) and a
    table of the mean AUCs, a row with a table of the AUCs of every image, and, when
    ``display_images`` is given, ``examples`` rows showing which pixels each method deletes
    first (the top 20 %). Computed in batches of ``batch_size`` images; the PNGs go to
    ``out_dir/images/metrics/``.

    Source: RISE (Petsiuk et al., BMVC 2018) deletion and insertion, as presented in the
    WACV 2025 tutorial "Inferential Machine Learning" (AlRegib & Prabhushankar).

    Args:
        model (Callable): the classifier (``nn.Module``), returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        display_images (Tensor, numpy.ndarray or None): the same images for the example
            rows, float in [0, 1] or uint8 (0..255), N x C x H x W (tensor) or N x H x W x C
            (array); None: no examples.
        class_names (Sequence[str] or None): one name per model output. None: the indices.
        out_dir (str or PathLike): the report folder.
        progress (bool, optional): tqdm progress bar on stderr. Default: True.
        n_steps (int, optional): perturbation steps of each curve. Default: 50.
        baselines (float, str or Tensor, optional): what a removed pixel becomes, as in
            :func:`~captum_ext.metrics.deletion`. Default: 0.0, which for inputs normalised
            with the dataset's mean and std is the per-channel dataset mean.
        batch_size (int, optional): images per attribution and metric call. Default: 64.
        labels (optional): true class per image (indices, or None where unknown), shown in
            the per-image table. Default: None.
        names (Sequence[str], optional): a name per image (e.g. file names). Default: ``#i``.
        examples (int, optional): how many images (the first ones) get an example row.
            Default: 1.
        alpha (float, optional): opacity of the red that marks the deleted pixels in the
            examples. Default: 0.6.
        title (str, optional): the section title.

    Returns:
        Section: the rows described above.

    Examples::

        >>> from captum_ext.viz import explanation_metrics_section
        >>> section = explanation_metrics_section(model, "features.7", images, shown,
        ...                                       DIGIT_CLASSES, "out", n_steps=28)
        >>> print(section.rows[0].table.rows[0])
        ['Grad-CAM', 'Why P?', '0.261', '0.762', '27 / 40', '30 / 40']
    """
    images = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    n_steps = _check_n_steps(n_steps)
    examples = _check_examples(examples)
    _check_overlay_options(alpha, None, "explanation_metrics_section()")
    n = images.shape[0]
    shown = None
    if display_images is not None:
        shown = _display_array(display_images, n, (images.shape[2], images.shape[3]))
    labels = _check_names_labels(names, labels, n)
    data = compute_explanation_metrics(
        model,
        layer,
        images,
        class_names=class_names,
        n_steps=n_steps,
        baselines=baselines,
        batch_size=batch_size,
        examples=examples if shown is not None else 0,
        progress=progress,
    )
    return render_explanation_metrics(
        data,
        shown,
        out_dir,
        labels=labels,
        names=names,
        alpha=alpha,
        title=title,
        progress=progress,
    )


def _check_n_steps(n_steps: Any) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"`n_steps` must be a positive int, got {n_steps!r}.")
    return n_steps


def _check_examples(examples: Any) -> int:
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ValueError(f"`examples` must be a non-negative int, got {examples!r}.")
    return examples


@dataclass(frozen=True)
class ExplanationMetricsData:
    r"""What :func:`compute_explanation_metrics` returns (numbers only;
    :func:`render_explanation_metrics` draws them). Every tensor and array is on the CPU.

    The methods are ``"gradcam"`` (Grad-CAM of P), ``"contrast"`` (ContrastCAM of P against
    the runner-up Q) and ``"counterfactual"`` (CounterfactualCAM of P); the metrics are
    ``"deletion"`` and ``"insertion"``, both following the probability of P.

    Attributes:
        predicted (Tensor): ``N`` predicted classes P.
        runner_up (Tensor): ``N`` runner-up classes Q.
        fractions (numpy.ndarray): ``n_steps + 1`` fractions of pixels perturbed, 0 to 1.
        auc (dict[str, dict[str, numpy.ndarray]]): metric -> method -> ``N`` AUCs, as
            :func:`~captum_ext.metrics.deletion` / :func:`~captum_ext.metrics.insertion`
            give them on the same maps.
        curves (dict[str, dict[str, numpy.ndarray]]): metric -> method -> ``N x
            (n_steps + 1)`` probability of P along the curve.
        maps (dict[str, numpy.ndarray]): method -> ``E x H x W`` maps (upsampled to the
            input, min-max scaled to [0, 1]) of the first ``E = min(examples, N)`` images.
        n_steps (int): perturbation steps of each curve.
        baselines (float, str or Tensor): what a removed pixel becomes.
        class_names (list[str]): one name per model output.
        layer_name (str): the layer explained ("" when unknown).
        image_size (tuple[int, int]): ``(H, W)`` of the inputs.
        empty (dict[str, numpy.ndarray]): method -> ``N`` bools, True where the method's map
            of the image is empty (every value 0, ``empty_maps``):
            it ranks no pixel above another, so its AUCs (kept in ``auc``, those of deleting
            the pixels in raster order) score no explanation; :attr:`mean_auc` and
            :attr:`best_counts` leave them out. Default: none empty.
    """

    predicted: Tensor
    runner_up: Tensor
    fractions: np.ndarray
    auc: dict[str, dict[str, np.ndarray]]
    curves: dict[str, dict[str, np.ndarray]]
    maps: dict[str, np.ndarray]
    n_steps: int
    baselines: Any
    class_names: list[str]
    layer_name: str
    image_size: tuple[int, int]
    empty: dict[str, np.ndarray] = field(default_factory=dict)

    def scored(self, method: str) -> np.ndarray:
        """``N`` bools: the images whose ``method`` map is not empty (its AUCs score it)."""
        n = self.predicted.shape[0]
        return ~np.asarray(self.empty.get(method, np.zeros(n, dtype=bool)), dtype=bool)

    @property
    def mean_auc(self) -> dict[str, dict[str, float]]:
        """metric -> method -> mean AUC over the images whose map of the method is not
        empty (NaN when every one is)."""
        means: dict[str, dict[str, float]] = {}
        for metric, by_method in self.auc.items():
            means[metric] = {}
            for method, values in by_method.items():
                kept = np.asarray(values, dtype=np.float64)[self.scored(method)]
                means[metric][method] = float(kept.mean()) if kept.size else float("nan")
        return means

    @property
    def best_counts(self) -> dict[str, dict[str, int]]:
        """metric -> method -> on how many images the method scores best (lowest deletion
        AUC, highest insertion AUC): every method equal to the best value counts on a tie;
        NaN AUCs (a model that overflowed) and the AUCs of empty maps (:attr:`empty`) never
        count, and an image with no other AUC counts for no method."""
        counts = {}
        for metric, pick in (("deletion", np.nanmin), ("insertion", np.nanmax)):
            table = np.stack([self.auc[metric][k] for k in _METHODS]).astype(np.float64)
            for row, kind in enumerate(_METHODS):
                table[row, ~self.scored(kind)] = np.nan  # an empty map scores nothing
            finite = ~np.isnan(table)
            scored = finite.any(axis=0)
            best = np.full(table.shape[1], np.nan)
            if scored.any():
                best[scored] = pick(table[:, scored], axis=0)
            winners = finite & (table == best[None, :])
            counts[metric] = {k: int(winners[i].sum()) for i, k in enumerate(_METHODS)}
        return counts


def compute_explanation_metrics(
    model: Callable,
    layer: Any,
    images: Tensor,
    *,
    class_names: Sequence[str] | None = None,
    n_steps: int = 50,
    baselines: Any = 0.0,
    batch_size: int = 64,
    examples: int = 1,
    progress: bool = False,
) -> ExplanationMetricsData:
    r"""The numbers of :func:`explanation_metrics_section`, without drawing or writing
    files: for each image the prediction P, the runner-up Q, and the deletion and insertion
    curves and AUCs (:func:`~captum_ext.metrics.deletion_curves`,
    :func:`~captum_ext.metrics.insertion_curves`, following P) of Grad-CAM of P,
    ContrastCAM against Q and CounterfactualCAM of P at ``layer``, each map upsampled to the
    input and min-max normalised. ``batch_size`` images per attribution and metric call, on
    the model's device.

    Args:
        model (Callable): the classifier, returning (N, C) logits, in eval mode.
        layer (nn.Module or str): the layer to explain, or its dotted name.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        class_names (Sequence[str], optional): one name per output. None: the indices.
        n_steps (int, optional): perturbation steps of each curve. Default: 50.
        baselines (float, str or Tensor, optional): what a removed pixel becomes, as in
            :func:`~captum_ext.metrics.deletion`. Default: 0.0.
        batch_size (int, optional): images per attribution and metric call. Default: 64.
        examples (int, optional): keep the maps of this many first images (for the example
            rows of :func:`render_explanation_metrics`). Default: 1.
        progress (bool, optional): progress bar on stderr. Default: False.

    Returns:
        :class:`ExplanationMetricsData`.

    Examples::

        >>> from captum_ext.viz import compute_explanation_metrics
        >>> data = compute_explanation_metrics(model, "features.7", x, n_steps=10)
        >>> sorted(data.auc["deletion"]), data.curves["deletion"]["gradcam"].shape
        (['contrast', 'counterfactual', 'gradcam'], (4, 11))
    """
    from captum_ext.attr import ContrastCAM, CounterfactualCAM, GradCAM
    from captum_ext.metrics import deletion_curves, insertion_curves

    images = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    n_steps = _check_n_steps(n_steps)
    examples = _check_examples(examples)
    n = images.shape[0]
    module = resolve_layer(model, layer)
    layer_name = _layer_name(model, layer, module)
    device = _model_device(model, images)
    cams = {
        "gradcam": GradCAM(model, module),
        "contrast": ContrastCAM(model, module),
        "counterfactual": CounterfactualCAM(model, module),
    }
    metrics = {"deletion": deletion_curves, "insertion": insertion_curves}

    aucs: dict[str, dict[str, list[Tensor]]] = {m: {k: [] for k in _METHODS} for m in metrics}
    curves: dict[str, dict[str, list[Tensor]]] = {m: {k: [] for k in _METHODS} for m in metrics}
    fractions: Tensor | None = None
    predicted_all: list[Tensor] = []
    runner_up_all: list[Tensor] = []
    example_maps: dict[str, list[np.ndarray]] = {k: [] for k in _METHODS}
    empty: dict[str, list[np.ndarray]] = {k: [] for k in _METHODS}
    names: list[str] = []
    with _progress_bar(n, "deletion / insertion", progress) as bar:
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].to(device)
            probabilities, predicted, runner_up = _predicted_and_runner_up(model, x)
            names = _class_names(class_names, probabilities.shape[1])
            predicted_all.append(predicted.cpu())
            runner_up_all.append(runner_up.cpu())
            for kind, cam in cams.items():
                classes = {"contrast": runner_up} if kind == "contrast" else {"target": predicted}
                heat = cam.attribute(x, **classes, upsample_to_input=True, normalize="minmax")
                empty[kind].append(empty_maps(heat))
                if start < examples:
                    example_maps[kind].append(_to_cpu(heat)[: examples - start, 0].numpy())
                for metric, function in metrics.items():
                    result = function(
                        model,
                        x,
                        heat.nan_to_num(0.0),  # NaN maps of NaN logits: their AUCs read NaN
                        target=predicted,
                        baselines=baselines,
                        n_steps=n_steps,
                    )
                    aucs[metric][kind].append(_to_cpu(result.auc))
                    curves[metric][kind].append(_to_cpu(result.curves))
                    fractions = _to_cpu(result.fractions)
            bar.update(x.shape[0])

    size = tuple(images.shape[2:])
    return ExplanationMetricsData(
        predicted=torch.cat(predicted_all),
        runner_up=torch.cat(runner_up_all),
        fractions=fractions.numpy(),
        auc={m: {k: torch.cat(v).numpy() for k, v in d.items()} for m, d in aucs.items()},
        curves={m: {k: torch.cat(v).numpy() for k, v in d.items()} for m, d in curves.items()},
        maps={
            k: np.concatenate(v) if v else np.zeros((0, *size), dtype=np.float32)
            for k, v in example_maps.items()
        },
        n_steps=n_steps,
        baselines=baselines,
        class_names=names,
        layer_name=layer_name,
        image_size=(int(size[0]), int(size[1])),
        empty={k: np.concatenate(v) for k, v in empty.items()},
    )


def render_explanation_metrics(
    data: ExplanationMetricsData,
    display_images: Any,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    alpha: float = 0.6,
    title: str = "Do the maps point at what the model uses? (deletion and insertion)",
    progress: bool = False,
) -> Section:
    r"""Draw :func:`compute_explanation_metrics`'s numbers into ``out_dir/images/metrics/``
    and return the section of :func:`explanation_metrics_section`: the plot of the mean
    curves with the table of mean AUCs, the table of AUCs per image and, when
    ``display_images`` is given, one example row per image whose maps ``data`` kept (the
    pixels each method deletes first).

    Args:
        data (ExplanationMetricsData): what :func:`compute_explanation_metrics` returned.
        display_images (Tensor, numpy.ndarray or None): the images in [0, 1] for the example
            rows (N x C x H x W tensor or N x H x W x C array); None: no examples.
        out_dir (str or PathLike): the report folder.
        labels (optional): true class per image (indices, or None where unknown).
        names (Sequence[str], optional): a name per image. Default: ``#i``.
        alpha (float, optional): opacity of the red marking the deleted pixels. Default: 0.6.
        title (str, optional): the section title.
        progress (bool, optional): a bar on stderr while the example figures are drawn.
            Default: False.

    Example images larger than the page shows them are drawn shrunk to at most
    ``FIGURE_PIXELS`` on their longer side.

    Returns:
        Section: as :func:`explanation_metrics_section`.
    """
    _check_overlay_options(alpha, None, "render_explanation_metrics()")
    n = data.predicted.shape[0]
    auc = data.auc
    class_names = data.class_names
    shown = None
    if display_images is not None:
        shown = _display_array(display_images, n, data.image_size)
    labels = _check_names_labels(names, labels, n)
    folder = Path(out_dir) / "images" / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    scored = {kind: data.scored(kind) for kind in _METHODS}
    mean_auc = data.mean_auc
    plot = _plot_curves(data.fractions, data.curves, mean_auc, scored, n, folder / "curves.png")

    explained_at = f" at layer {data.layer_name}" if data.layer_name else ""
    baselines = data.baselines
    if isinstance(baselines, str):
        baseline_text = {"mean": "the image's per-channel mean", "blur": "a blurred copy"}.get(
            baselines, baselines
        )
    elif isinstance(baselines, (int, float)):
        baseline_text = f"the value {float(baselines):g} of the model's (normalised) input"
    else:
        baseline_text = "the given baseline image"
    section = Section(
        title,
        intro=(
            "Deletion and insertion judge a map by intervening on the image with it. "
            f"Deletion replaces the pixels in the order of the map (most important first) "
            f"by {baseline_text} and follows the probability of the predicted class P; "
            "insertion starts from the baseline and puts the pixels back in the same order. "
            f"Each curve has {data.n_steps} steps; the score is its area (AUC).\n"
            "Lower deletion AUC is better (the map found pixels the model needs); higher "
            "insertion AUC is better (those pixels suffice).\n"
            f"Maps{explained_at}: Grad-CAM of P ('Why P?'), ContrastCAM against the runner-up "
            "class Q ('Why P, rather than Q?') and CounterfactualCAM ('What if not P?', the "
            "evidence against P; it is expected to score worst, as a reference).\n"
            "A map with no evidence at all (every value 0) is marked 'empty': it ranks no "
            "pixel above another (deletion would remove the pixels row by row), so its AUCs "
            "are n/a, left out of the means, the curves and the counts of the best method."
        ),
    )
    mean_table = Table(
        [
            "method",
            "question",
            "deletion AUC (lower is better)",
            "insertion AUC (higher is better)",
            "best deletion on",
            "best insertion on",
        ],
        caption=(
            f"Mean AUC over {n} images (those with an empty map of the method left out), and "
            "on how many images each method scores best (every method on a tie; an image's "
            "NaN AUCs and those of empty maps count for no method)"
        ),
    )
    best = data.best_counts
    for kind in _METHODS:
        mean_table.add_row(
            [
                _METHOD_NAMES[kind],
                _QUESTIONS[kind],
                *(_mean_cell(mean_auc[metric][kind], scored[kind]) for metric in _METRICS),
                f"{best['deletion'][kind]} / {n}",
                f"{best['insertion'][kind]} / {n}",
            ]
        )
    section.add_row(
        f"Mean over {n} images",
        [Figure("Mean deletion and insertion curves of the three methods", plot, _PLOT_WIDTH)],
        table=mean_table,
    )
    _with_labels = labels is not None and any(label is not None for label in labels)
    columns = ["image", "predicted P", "runner-up Q"] + (["true class"] if _with_labels else [])
    columns += [f"deletion {_METHOD_NAMES[k]}" for k in _METHODS]
    columns += [f"insertion {_METHOD_NAMES[k]}" for k in _METHODS]
    per_image = Table(columns, caption="AUC per image")
    for i in range(n):
        cells = [
            _image_name(names, i),
            class_names[int(data.predicted[i])],
            class_names[int(data.runner_up[i])],
        ]
        if _with_labels:
            true = _true_class(labels, i, class_names)
            cells.append("-" if true is None else class_names[true])
        for metric in _METRICS:
            cells += [f"{auc[metric][k][i]:.3f}" if scored[k][i] else _EMPTY_CELL for k in _METHODS]
        per_image.add_row(cells)
    section.add_row("Per image", table=per_image)

    if shown is not None:
        examples = min(data.maps["gradcam"].shape[0], n)
        with _progress_bar(examples, "drawing metrics figures", progress) as progress_shown:
            for i in range(examples):
                stem = folder / f"{i:05d}"
                # the pixels deleted first are chosen on the full map, then shrunk with the
                # image (a shrunk mask gives the share of each pixel that is deleted)
                masks = [_first_pixels(data.maps[kind][i], _EXAMPLE_FRACTION) for kind in _METHODS]
                image, *masks = _for_figure(shown[i], *masks)
                figures = [("Input", save_png(image, f"{stem}_input.png"))]
                for kind, mask in zip(_METHODS, masks, strict=True):
                    picture = _mark(image, mask, alpha)
                    if scored[kind][i]:
                        caption = (
                            f"{_METHOD_NAMES[kind]}: first {_EXAMPLE_FRACTION:.0%} deleted; "
                            f"deletion AUC {auc['deletion'][kind][i]:.3f}, "
                            f"insertion AUC {auc['insertion'][kind][i]:.3f}"
                        )
                    else:  # no order of its own: the pixels marked are the first rows
                        caption = (
                            f"{_METHOD_NAMES[kind]}{EMPTY_CAPTION}: no pixel ranks above "
                            "another; deletion and insertion AUC n/a"
                        )
                    figures.append((caption, save_png(picture, f"{stem}_{kind}_first.png")))
                p = int(data.predicted[i])
                section.add_row(
                    f"Example {_image_name(names, i)} (predicted {class_names[p]}): the pixels "
                    f"each map deletes first (red)",
                    figures,
                )
                progress_shown.update(1)
    return section
