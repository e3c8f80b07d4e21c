"""Circuit graphs from neuron pathways (the masks of ``PathwayGradient``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from .readout import node_id


def _check_masks(masks: Any, argument: str) -> dict[str, Tensor]:
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError(
            f"`{argument}` must be a non-empty dict of layer name -> (N, C, ...) tensor (the "
            f"`masks` of a PathwayGradientResult), got {type(masks).__name__}."
        )
    checked = {}
    n = None
    for name, tensor in masks.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor) or tensor.dim() < 2:
            raise ValueError(
                f"`{argument}`: entry {name!r} must map a layer name to an (N, C, ...) tensor."
            )
        if n is not None and tensor.shape[0] != n:
            raise ValueError(
                f"`{argument}`: layer {name!r} has {tensor.shape[0]} examples, the others {n}."
            )
        n = tensor.shape[0]
        checked[name] = tensor
    return checked


def pathway_graphs(
    masks: Mapping[str, Tensor] | Any,
    scores: Mapping[str, Tensor] | None = None,
    *,
    target: Tensor | None = None,
) -> list[nx.DiGraph]:
    r"""The channels a neuron pathway runs through, as one circuit graph per example.

    A pathway (the ``masks`` of ``PathwayGradient.attribute(..., return_pathway=True)``, or
    any per-layer binary masks of the same shapes as the layers' outputs) keeps a set of
    neurons. Channel ``c`` of layer ``l`` becomes the node ``"<l>:<c>"`` (the key
    :class:`CircuitReadout` uses) when the pathway keeps at least one of its neurons:

    .. code-block:: text

        kept(l, c)   = sum over positions p of M_l[c, p]              (> 0: a node)
        energy(l, c) = sum over positions p of M_l[c, p] * s_l[c, p]  (with scores s)
                     = kept(l, c) / positions                         (without scores)

    so with PathwayGradient's Taylor scores a node's energy is the contribution its kept
    neurons make to the explained logit. The graphs have nodes only: a pathway is a set of
    neurons, and which kept channels feed which is a property of the weights (use
    :class:`CircuitReadout` for weighted connections). :func:`compare` then gives the overlap
    of two pathways (``node_jaccard``), or of a pathway and a readout circuit, whose nodes
    share keys when the pathway's layers are the readout's stages.

    Args:
        masks (dict[str, Tensor], or PathwayGradientResult): per layer, an (N, C, ...)
            tensor, non-zero for the neurons kept; a ``PathwayGradientResult`` gives its
            ``masks``, ``scores`` and ``target``.
        scores (dict[str, Tensor], optional): per layer, the neuron scores (same shapes).
        target (Tensor, optional): (N,) class explained per example, stored as a graph
            attribute.

    Returns:
        list of networkx.DiGraph: one per example, with node attributes ``layer``,
        ``channel``, ``stage`` (the layer's position in ``masks``), ``kept`` (int) and
        ``energy`` (float), and graph attributes ``example``, ``stages`` and ``target``
        (when known).

    Examples::

        >>> from captum_ext.attr import PathwayGradient
        >>> from captum_ext.circuits import compare, pathway_graphs
        >>> result = PathwayGradient(model).attribute(x[:2], sparsity=0.9, return_pathway=True)
        >>> graphs = pathway_graphs(result)
        >>> sorted({layer for _, layer in graphs[0].nodes(data="layer")})
        ['features.1', 'features.4', 'features.7']
        >>> 0.0 < compare(graphs[0], graphs[1]).node_jaccard < 1.0
        True
    """
    if scores is None and hasattr(masks, "masks") and hasattr(masks, "scores"):
        if target is None:
            target = getattr(masks, "target", None)
        masks, scores = masks.masks, masks.scores
    masks = _check_masks(masks, "masks")
    if scores is not None:
        scores = _check_masks(scores, "scores")
        for name, mask in masks.items():
            if name not in scores or scores[name].shape != mask.shape:
                raise ValueError(
                    f"`scores` needs an entry of shape {tuple(mask.shape)} for layer {name!r}."
                )
    n = next(iter(masks.values())).shape[0]
    targets = None
    if target is not None:
        targets = torch.as_tensor(target).reshape(-1).tolist()
        if len(targets) != n:
            raise ValueError(f"`target` has {len(targets)} entries for {n} examples.")
    stages = list(masks)
    per_layer = []
    for name, mask in masks.items():
        keep = (mask != 0).flatten(2) if mask.dim() > 2 else (mask != 0).unsqueeze(2)
        kept = keep.sum(dim=2)  # (N, C)
        if scores is not None:
            values = scores[name].detach()
            values = values.flatten(2) if values.dim() > 2 else values.unsqueeze(2)
            work = torch.float64 if values.dtype == torch.float64 else torch.float32
            energy = (values.to(work) * keep).sum(dim=2)
        else:
            energy = kept.cpu().double() / keep.shape[2]
        per_layer.append((kept.cpu().tolist(), energy.cpu().tolist()))
    graphs = []
    for b in range(n):
        graph = nx.DiGraph(example=b, stages=list(stages))
        if targets is not None:
            graph.graph["target"] = int(targets[b])
        for stage, (name, (kept, energy)) in enumerate(zip(stages, per_layer)):
            for c, count in enumerate(kept[b]):
                if count:
                    graph.add_node(
                        node_id(name, c),
                        layer=name,
                        channel=c,
                        stage=stage,
                        kept=int(count),
                        energy=float(energy[b][c]),
                    )
        graphs.append(graph)
    return graphs
