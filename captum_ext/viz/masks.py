r"""Report section "What is the least this image needs?" (minimal masks and their circuits).

:func:`minimal_mask_section` explains each image with an
:class:`~captum_ext.attr.ActivationMatchingMask` (the smallest binary mask whose masked image
keeps the model's decision and activations) and reads, with
:class:`~captum_ext.circuits.CircuitReadout`, the channel-level circuit the model uses for
the image and for its masked version, so the two pathways can be compared.

Papers: Suhail, Anand & Sethi, "Activation Matching for Explanation Generation" (arXiv
2509.23051) and "Minimalist Explanation Generation and Circuit Discovery" (arXiv 2509.25686).

:func:`minimal_mask_section` is :func:`compute_minimal_mask` (the numbers, a
:class:`MinimalMaskData`; no matplotlib, no files) followed by :func:`render_minimal_mask`
(the figures and the page).

Example::

    >>> from captum_ext.bundled import load_bundled_mask_explainer, load_bundled_model
    >>> from captum_ext.data import DIGIT_CLASSES, denormalize_digits, load_sample_digits
    >>> from captum_ext.viz import Report, minimal_mask_section
    >>> model = load_bundled_model()
    >>> images, labels = load_sample_digits()
    >>> images = images[:8]                                # 8 digits keep the example quick
    >>> report = Report("Digits")
    >>> section = report.add_section(minimal_mask_section(
    ...     model, images, denormalize_digits(images), DIGIT_CLASSES, "out",
    ...     explainer=load_bundled_mask_explainer(model)))
    >>> report.write("out").name
    'index.html'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    _check_count,
    _check_images,
    _check_names_labels,
    _class_names,
    _to_cpu,
    _true_class,
)
from ._figures import new_figure, save_figure
from .overlay import save_png, to_uint8_rgb
from .report import (
    Figure,
    Section,
    Table,
    _check_batch_size,
    _display_array,
    _for_figure,
    _model_device,
    _probabilities,
    _progress_bar,
)

__all__ = [
    "MinimalMaskData",
    "compute_minimal_mask",
    "minimal_mask_section",
    "render_minimal_mask",
]

_MODES = ("amortised", "per_image")
#: width in the page (CSS pixels) of a circuit plot
_CIRCUIT_WIDTH = 300
#: height (pixels) of a circuit plot
_CIRCUIT_HEIGHT = 220
#: the colour (uint8, every channel) of the pixels a mask leaves out, in the "kept pixels"
#: picture: mid-grey, so that scattered kept pixels stand out from both dark and light parts
#: of the image instead of looking like noise on a black background
_LEFT_OUT_GREY = 128


def _kept_share(mask: np.ndarray) -> np.ndarray:
    """H x W x 1: the share of each pixel that ``mask`` keeps, clipped to [0, 1]: 1 or 0 for
    a 0 / 1 mask at the image's size, a share between them for one shrunk with its image by
    :func:`~captum_ext.viz.report._for_figure`."""
    return np.clip(np.asarray(mask, dtype=np.float64), 0.0, 1.0)[:, :, None]


def _mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image in grey with the kept pixels tinted red (``mask``: see :func:`_kept_share`)."""
    rgb = to_uint8_rgb(image).astype(np.float64) / 255.0
    grey = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
    red = np.array([1.0, 0.1, 0.1])
    kept = _kept_share(mask)
    tinted = kept * (0.45 * grey + 0.55 * red) + (1.0 - kept) * (0.6 * grey)
    return (255 * tinted.clip(0, 1)).round().astype(np.uint8)


def _kept_pixels(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The kept pixels of the image on a mid-grey background (the left-out pixels);
    ``mask``: see :func:`_kept_share`."""
    rgb = to_uint8_rgb(image).astype(np.float64)
    kept = _kept_share(mask)
    blended = kept * rgb + (1.0 - kept) * float(_LEFT_OUT_GREY)
    return blended.round().clip(0, 255).astype(np.uint8)


def _save_circuit(graph: Any, title: str, path: Path) -> Path:
    from captum_ext.circuits import draw

    # drawn at the width the page shows it, so that its labels are read at their size
    figure = new_figure(_CIRCUIT_WIDTH, _CIRCUIT_HEIGHT)
    ax = figure.subplots()
    draw(graph, ax=ax)
    ax.set_title(title, fontsize=10)
    return save_figure(figure, path)


def minimal_mask_section(
    model: Callable,
    images: Tensor,
    display_images: Any,
    class_names: Sequence[str] | None,
    out_dir: str | os.PathLike,
    progress: bool = True,
    *,
    explainer: Any,
    mode: str = "amortised",
    steps: int = 300,
    circuit: Any = None,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 64,
    circuit_rows: int = 5,
    seed: int = 0,
    title: str = "What is the least this image needs? (minimal masks and circuits)",
) -> Section:
    r"""The section "What is the least this image needs?": a minimal mask per image and the
    circuits of the image and of its masked version.

    For each image x with prediction y, ``explainer`` (an
    :class:`~captum_ext.attr.ActivationMatchingMask`) gives a binary mask m and the
    explanation e = m * x + (1 - m) * baseline; the section reports, as the papers do,

    .. code-block:: text

        active pixels  = mean(m)                                 (smaller: more minimal)
        agreement      = argmax f(e) == argmax f(x)
        confidence     = softmax f(x)[y]  ->  softmax f(e)[y]
        sufficiency    = share of K random backgrounds r with argmax f(m x + (1 - m) r) == y
        necessity      = z_y(x) - z_y((1 - m) x + m baseline)    (larger: the kept pixels matter)

    and, for the first ``circuit_rows`` images, the channel-level circuits of x and of e
    (:class:`~captum_ext.circuits.CircuitReadout`) with what they share
    (:func:`~captum_ext.circuits.compare`: node and edge Jaccard, share of x's flow retained
    by e's circuit).

    Rows: a summary table (means over all images, and over the correctly and wrongly
    classified ones when ``labels`` are given), then one row per image: the input, the mask
    over it (kept pixels in red), the kept pixels on a mid-grey background, and, for the first
    ``circuit_rows`` images, the two circuit plots. The PNGs go to
    ``out_dir/images/masks/``.

    Args:
        model (Callable): the classifier (``nn.Module``), returning (N, C) logits, in eval mode.
        images (Tensor): N x C x H x W inputs, normalised as the model expects.
        display_images (Tensor or numpy.ndarray): the same images for display, float in
            [0, 1] or uint8 (0..255).
        class_names (Sequence[str] or None): one name per model output. None: the indices.
        out_dir (str or PathLike): the report folder.
        progress (bool, optional): tqdm progress bars on stderr. Default: True.
        explainer (ActivationMatchingMask): the mask explainer of ``model``; for
            ``mode="amortised"`` its mask net must be trained
            (:meth:`~captum_ext.attr.ActivationMatchingMask.fit` or
            :meth:`~captum_ext.attr.ActivationMatchingMask.load`;
            :func:`captum_ext.bundled.load_bundled_mask_explainer` for the bundled model).
        mode (str, optional): ``"amortised"`` (one forward pass of the mask net) or
            ``"per_image"`` (a mask net fitted to each image, ``steps`` Adam steps: slow).
            Default: ``"amortised"``.
        steps (int, optional): Adam steps per image in ``"per_image"`` mode. Default: 300.
        circuit (CircuitReadout, optional): the circuit readout. Default:
            ``CircuitReadout(model)`` with its automatic layers.
        labels (optional): true class per image (indices, or None where unknown).
        names (Sequence[str], optional): a name per image. Default: ``#i``.
        batch_size (int, optional): images per explainer call. Default: 64.
        circuit_rows (int, optional): how many images (the first ones) get circuit plots.
            Default: 5.
        seed (int, optional): seed of the explainer (backgrounds, per-image fits).
        title (str, optional): the section title.

    Returns:
        Section: the rows described above.

    Examples::

        >>> from captum_ext.bundled import load_bundled_mask_explainer
        >>> from captum_ext.viz import minimal_mask_section
        >>> explainer = load_bundled_mask_explainer(model)  # its trained mask network
        >>> section = minimal_mask_section(model, images[:8], shown[:8], DIGIT_CLASSES, "out",
        ...                                explainer=explainer, circuit_rows=2)
        >>> section.rows[0].table.columns[:3]
        ['images', 'count', 'active pixels']
    """
    _check_arguments(images, batch_size, circuit_rows, explainer, mode, circuit)
    n = images.shape[0]
    shown = _display_array(display_images, n, (images.shape[2], images.shape[3]))
    labels = _check_names_labels(names, labels, n)
    data = compute_minimal_mask(
        model,
        images,
        explainer=explainer,
        mode=mode,
        steps=steps,
        circuit=circuit,
        class_names=class_names,
        batch_size=batch_size,
        circuit_rows=circuit_rows,
        seed=seed,
        progress=progress,
    )
    return render_minimal_mask(
        data, shown, out_dir, labels=labels, names=names, title=title, progress=progress
    )


def _check_arguments(
    images: Any, batch_size: Any, circuit_rows: Any, explainer: Any, mode: Any, circuit: Any
) -> tuple[Tensor, int, int]:
    from captum_ext.attr import ActivationMatchingMask
    from captum_ext.circuits import CircuitReadout

    images = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    circuit_rows = _check_count(circuit_rows, "circuit_rows")
    if not isinstance(explainer, ActivationMatchingMask):
        raise TypeError(
            "`explainer` must be an ActivationMatchingMask (fitted, for the amortised mode), "
            f"got {type(explainer).__name__}."
        )
    if mode not in _MODES:
        raise ValueError(f"`mode`={mode!r}: expected one of {', '.join(_MODES)}.")
    if circuit is not None and not isinstance(circuit, CircuitReadout):
        raise TypeError(f"`circuit` must be a CircuitReadout, got {type(circuit).__name__}.")
    return images, batch_size, circuit_rows


@dataclass(frozen=True)
class MinimalMaskData:
    """What :func:`compute_minimal_mask` returns (numbers only; :func:`render_minimal_mask`
    draws them).

    Attributes:
        mask (numpy.ndarray): ``N x H x W`` binary masks m (1: kept pixel).
        active (numpy.ndarray): ``N`` shares of kept pixels, ``mean(m)``.
        agreement (numpy.ndarray): ``N`` bools, ``argmax f(e) == argmax f(x)`` for the explanation
            ``e = m x + (1 - m) baseline``.
        confidence (numpy.ndarray): ``N`` values ``softmax f(x)[y]``.
        kept_confidence (numpy.ndarray): ``N`` values ``softmax f(e)[y]`` of the explanation.
        sufficiency (numpy.ndarray): ``N`` shares of random backgrounds keeping the class.
        necessity (numpy.ndarray): ``N`` logit drops when only the pixels outside m remain.
        target (list[int]): the predicted class y of each image.
        class_names (list[str]): one name per model output.
        mode (str): the explainer's mode, ``"amortised"`` or ``"per_image"``.
        circuits (dict[int, tuple]): image index -> (circuit of x, circuit of e), for the
            first ``circuit_rows`` images.
        comparisons (dict[int, Any]): image index -> :func:`~captum_ext.circuits.compare` of
            those two circuits.
        circuit_problem (str or None): why no circuit was read out, when the automatic
            :class:`~captum_ext.circuits.CircuitReadout` cannot follow the network (e.g. its
            attention layers); None otherwise.
    """

    mask: np.ndarray
    active: np.ndarray
    agreement: np.ndarray
    confidence: np.ndarray
    kept_confidence: np.ndarray
    sufficiency: np.ndarray
    necessity: np.ndarray
    target: list[int]
    class_names: list[str]
    mode: str
    circuits: dict[int, tuple[Any, Any]]
    comparisons: dict[int, Any]
    circuit_problem: str | None = None


def compute_minimal_mask(
    model: Callable,
    images: Tensor,
    *,
    explainer: Any,
    mode: str = "amortised",
    steps: int = 300,
    circuit: Any = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    circuit_rows: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> MinimalMaskData:
    r"""The numbers of :func:`minimal_mask_section`, without drawing: the masks of
    ``explainer`` (in batches of ``batch_size``, seeded ``seed + start`` per batch), their
    read-outs (active pixels, agreement, confidence, sufficiency, necessity; see
    :func:`minimal_mask_section`), and for the first ``circuit_rows`` images the circuits of
    x and of its explanation e with their :func:`~captum_ext.circuits.compare`.

    Args: as :func:`minimal_mask_section` (``progress`` defaults to False here).

    Returns:
        :class:`MinimalMaskData`.
    """
    from captum_ext.circuits import CircuitReadout, compare

    images, batch_size, circuit_rows = _check_arguments(
        images, batch_size, circuit_rows, explainer, mode, circuit
    )
    n = images.shape[0]
    device = _model_device(model, images)
    parts = []
    for start in range(0, n, batch_size):
        x = images[start : start + batch_size].to(device)
        parts.append(
            explainer.attribute(
                x,
                mode=mode,
                steps=steps,
                seed=seed + start,
                return_details=True,
                progress=progress,
            )
        )

    def column(name: str) -> Tensor:
        return torch.cat([_to_cpu(getattr(part, name)) for part in parts])

    target = torch.cat([part.target.cpu() for part in parts]).tolist()
    class_names = _class_names(class_names, _probabilities(model, images[:1].to(device)).shape[1])
    circuits: dict[int, tuple[Any, Any]] = {}
    comparisons: dict[int, Any] = {}
    chosen = list(range(min(circuit_rows, n)))
    circuit_problem = None
    if chosen:
        x = images[chosen].to(device)
        explanations = torch.cat([part.explanation for part in parts])[chosen].to(device)
        chosen_targets = torch.tensor([target[i] for i in chosen])
        try:
            readout = circuit if circuit is not None else CircuitReadout(model)
            graphs_x = readout.readout(x, target=chosen_targets)
            graphs_e = readout.readout(explanations, target=chosen_targets)
        except ValueError as error:
            if circuit is not None:  # the caller's own readout: its error is theirs to see
                raise
            # the automatic readout cannot follow this network (attention, say): the masks
            # stand on their own, and the section says why no circuit is drawn
            circuit_problem = str(error).strip().splitlines()[0]
        else:
            for i, graph_x, graph_e in zip(chosen, graphs_x, graphs_e):
                circuits[i] = (graph_x, graph_e)
                comparisons[i] = compare(graph_x, graph_e)
    return MinimalMaskData(
        mask=column("mask")[:, 0].numpy(),
        active=column("active_fraction").numpy(),
        agreement=column("agreement").numpy() > 0.5,
        confidence=column("confidence").numpy(),
        kept_confidence=column("explanation_confidence").numpy(),
        sufficiency=column("sufficiency").numpy(),
        necessity=column("necessity").numpy(),
        target=target,
        class_names=class_names,
        mode=mode,
        circuits=circuits,
        comparisons=comparisons,
        circuit_problem=circuit_problem,
    )


def render_minimal_mask(
    data: MinimalMaskData,
    display_images: Any,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[Any] | Tensor | None = None,
    names: Sequence[str] | None = None,
    title: str = "What is the least this image needs? (minimal masks and circuits)",
    progress: bool = False,
) -> Section:
    """Draw :func:`compute_minimal_mask`'s masks over ``display_images`` (the images in
    [0, 1], N x H x W x C or a tensor) and its circuits into ``out_dir/images/masks/`` and
    return the Section (rows as in :func:`minimal_mask_section`). Images larger than the page
    shows them are drawn shrunk to at most ``FIGURE_PIXELS`` on
    their longer side, with their masks. ``progress``: a bar on stderr while the figures are
    drawn. Default: False."""
    n = data.mask.shape[0]
    shown = _display_array(display_images, n, data.mask.shape[1:])
    labels = _check_names_labels(names, labels, n)
    class_names, target = data.class_names, data.target
    mask, active, agreement = data.mask, data.active, data.agreement
    confidence, kept_confidence = data.confidence, data.kept_confidence
    sufficiency, necessity = data.sufficiency, data.necessity
    comparisons = data.comparisons
    folder = Path(out_dir) / "images" / "masks"
    folder.mkdir(parents=True, exist_ok=True)

    circuit_figures: dict[int, list[Figure]] = {}
    for i, (graph_x, graph_e) in data.circuits.items():
        stem = folder / f"{i:05d}"
        circuit_figures[i] = [
            Figure(
                "Circuit of the image",
                _save_circuit(graph_x, "circuit of x", Path(f"{stem}_circuit_x.png")),
                _CIRCUIT_WIDTH,
            ),
            Figure(
                "Circuit of the kept pixels: "
                f"edge Jaccard {comparisons[i].edge_jaccard:.2f}, "
                f"flow retained {comparisons[i].flow_retained:.1%}",
                _save_circuit(graph_e, "circuit of m * x", Path(f"{stem}_circuit_e.png")),
                _CIRCUIT_WIDTH,
            ),
        ]

    truth = [_true_class(labels, i, class_names) for i in range(n)]
    correct = [None if t is None else t == target[i] for i, t in enumerate(truth)]
    mode = data.mode
    section = Section(
        title,
        intro=(
            "For each image, the smallest binary mask whose masked image keeps the model's "
            "decision and its internal activations (activation matching, "
            f"{mode.replace('_', '-')} mode). Pictures: the image; the mask (the image in "
            "grey, the kept pixels in red); the kept pixels alone, on a mid-grey background "
            "(grey: left out). Active "
            "pixels: the share of the image the mask keeps. Agreement: the masked image gets the "
            "same class. Sufficiency: the class survives when the rest of the image is random "
            "noise. Necessity: how far the class's logit drops when only the pixels outside the "
            "mask are shown. The circuits (channel-level graphs: the strongest channels of each "
            "stage and the connections between them) of the image and of its kept pixels show "
            "whether the masked image travels the same pathway through the network."
            + (
                f" No circuits are drawn: the circuit readout cannot follow this network "
                f"({data.circuit_problem.rstrip('.')})."
                if data.circuit_problem
                else ""
            )
            + (
                f" Circuits are drawn for the first {len(comparisons)} of the {n} images."
                if comparisons and len(comparisons) < n
                else ""
            )
        ),
    )
    summary = Table(
        [
            "images",
            "count",
            "active pixels",
            "agreement",
            "confidence x -> m * x",
            "sufficiency",
            "necessity (logit drop)",
        ],
        caption="Mean read-outs of the masks",
    )
    groups = [("all", np.ones(n, dtype=bool))]
    if any(c is not None for c in correct):
        groups.append(("correctly classified", np.array([c is True for c in correct])))
        groups.append(("wrongly classified", np.array([c is False for c in correct])))
    for group, member in groups:
        if not member.any():
            summary.add_row([group, 0, "-", "-", "-", "-", "-"])
            continue
        summary.add_row(
            [
                group,
                int(member.sum()),
                f"{100 * active[member].mean():.1f}%",
                f"{100 * agreement[member].mean():.0f}%",
                f"{confidence[member].mean():.3f} -> {kept_confidence[member].mean():.3f}",
                f"{100 * sufficiency[member].mean():.0f}%",
                f"{necessity[member].mean():.2f}",
            ]
        )
    section.add_row("Summary", table=summary)
    if comparisons:
        shared = Table(
            ["image", "node Jaccard", "edge Jaccard", "flow retained"],
            caption="What the circuit of the kept pixels shares with the circuit of the image",
        )
        for i, comparison in comparisons.items():
            shared.add_row(
                [
                    str(names[i]) if names is not None else f"#{i}",
                    f"{comparison.node_jaccard:.3f}",
                    f"{comparison.edge_jaccard:.3f}",
                    f"{comparison.flow_retained:.1%}",
                ]
            )
        section.add_row("Circuits", table=shared)

    with _progress_bar(n, "drawing masks figures", progress) as bar:
        for i in range(n):
            y = target[i]
            stem = folder / f"{i:05d}"
            # a pixel is kept where the mask is above 0; shrunk, the share of it that is kept
            image, kept = _for_figure(shown[i], (mask[i] > 0).astype(np.float32))
            figures: list[Any] = [
                ("Input", save_png(image, f"{stem}_input.png")),
                (
                    f"Mask: {100 * active[i]:.1f}% of the pixels",
                    save_png(_mask_overlay(image, kept), f"{stem}_mask.png"),
                ),
                (
                    f"Kept pixels (grey: left out): {class_names[y]} at "
                    f"{kept_confidence[i]:.1%} "
                    f"({'same class' if agreement[i] else 'class changed'})",
                    save_png(_kept_pixels(image, kept), f"{stem}_kept.png"),
                ),
            ]
            figures += circuit_figures.get(i, [])
            name = str(names[i]) if names is not None else f"#{i}"
            label = (
                f"{name}: predicted {class_names[y]} ({confidence[i]:.1%}); sufficiency "
                f"{sufficiency[i]:.0%}, necessity {necessity[i]:.2f}"
            )
            if truth[i] is not None:
                verdict = "correct" if correct[i] else "wrong"
                label += f"; true class {class_names[truth[i]]} ({verdict})"
            section.add_row(label, figures)
            bar.update(1)
    return section
