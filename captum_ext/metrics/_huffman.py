"""Huffman code lengths of symbol histograms (the lossless code of the structure-wise metrics).

The total length of a Huffman code for a message with symbol counts ``c_1 .. c_K`` is
``sum_k c_k * len_k``. It equals the sum of the weights of all the internal nodes made while
building the tree (each merge of weights ``a`` and ``b`` adds one bit to every symbol below it,
i.e. ``a + b`` bits in total), which is what :func:`huffman_bits` adds up with a min-heap.

Conventions:

- symbols with count 0 are not coded;
- a histogram with a single used symbol is coded with 1 bit per occurrence (a one-leaf tree
  still needs a codeword, as a 1-bit code would be used in practice);
- an empty histogram (all counts 0) costs 0 bits.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def _used_counts(counts: Iterable[int]) -> list[int]:
    used = []
    for count in counts:
        value = int(count)
        if value < 0:
            raise ValueError(f"symbol counts must be non-negative, got {value}.")
        if value:
            used.append(value)
    return used


def huffman_bits(counts: Iterable[int]) -> int:
    """Total bits of a Huffman code for a message with these symbol counts.

    Args:
        counts (iterable of int): how often each symbol occurs (zeros are skipped).

    Returns:
        int: ``sum_k counts[k] * code_length[k]``; see the module docstring for the single-
        symbol (1 bit each) and empty (0 bits) conventions.
    """
    heap = _used_counts(counts)
    if not heap:
        return 0
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def huffman_code_lengths(counts: Sequence[int]) -> list[int]:
    """Code length in bits of each symbol of a Huffman code (0 for symbols that never occur).

    Builds the tree with parent links (ties broken by insertion order) and reads every leaf's
    depth. With a single used symbol its length is 1 by convention.

    Args:
        counts (sequence of int): how often each symbol occurs.

    Returns:
        list[int]: one length per entry of ``counts``.
    """
    values = [int(c) for c in counts]
    _used_counts(values)  # validation
    lengths = [0] * len(values)
    leaves = [k for k, c in enumerate(values) if c]
    if len(leaves) == 1:
        lengths[leaves[0]] = 1
    if len(leaves) < 2:
        return lengths
    parent: list[int] = [-1] * len(leaves)
    heap = [(values[k], node, node) for node, k in enumerate(leaves)]
    heapq.heapify(heap)
    order = len(leaves)
    while len(heap) > 1:
        weight_a, _, node_a = heapq.heappop(heap)
        weight_b, _, node_b = heapq.heappop(heap)
        new = len(parent)
        parent.append(-1)
        parent[node_a] = new
        parent[node_b] = new
        heapq.heappush(heap, (weight_a + weight_b, order, new))
        order += 1
    depth: dict[int, int] = {len(parent) - 1: 0}

    def depth_of(node: int) -> int:
        chain = []
        while node not in depth:
            chain.append(node)
            node = parent[node]
        d = depth[node]
        for item in reversed(chain):
            d += 1
            depth[item] = d
        return d

    for node, k in enumerate(leaves):
        lengths[k] = depth_of(node)
    return lengths


def huffman_bits_of_images(values: Tensor, n_symbols: int = 256) -> Tensor:
    """Huffman bits of each row of integer ``values`` (M, ...) in ``0 .. n_symbols - 1``.

    The histograms are counted on the tensor's device in one pass; the heap runs in Python
    (at most ``n_symbols`` entries per row).

    Returns:
        Tensor: int64 (M,) on the device of ``values``.
    """
    flat = values.reshape(values.shape[0], -1).long()
    histograms = torch.zeros(flat.shape[0], n_symbols, dtype=torch.long, device=flat.device)
    histograms.scatter_add_(1, flat, torch.ones_like(flat))
    bits = [huffman_bits(row) for row in histograms.tolist()]
    return torch.tensor(bits, dtype=torch.long, device=values.device)
