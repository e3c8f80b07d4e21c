"""score_dataset cuts per-example tensors nested in additional_forward_args (dicts, lists)
per batch, as it cuts top-level ones, and recognises equal nested arguments as the same."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_ext.metrics import score_dataset


class _MetaNet(nn.Module):
    """Logits of the image plus a large per-example offset taken from the metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))

    def forward(self, x, meta):
        if isinstance(meta, dict):
            meta = meta["meta"]
        elif isinstance(meta, list):
            (meta,) = meta
        return self.body(x) + 20.0 * meta


def _data(n: int = 12):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 2, 2, generator=generator)
    meta = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    y = torch.arange(n) % 3
    return x, meta, y


def _scores(extra):
    torch.manual_seed(0)
    model = _MetaNet().eval()
    x, meta, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    return score_dataset(model, loader, scores=["softmax"], additional_forward_args=extra(meta))


def test_nested_metadata_is_cut_per_batch_like_top_level_metadata():
    plain = _scores(lambda meta: meta)
    for nested in (lambda meta: ({"meta": meta},), lambda meta: ([meta],)):
        table = _scores(nested)
        assert torch.equal(table["prediction"], plain["prediction"])
        torch.testing.assert_close(table["softmax"], plain["softmax"])
    # the metadata decides the prediction: example i predicts class i % 3
    assert torch.equal(plain["prediction"], torch.arange(12) % 3)
