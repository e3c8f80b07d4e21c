"""score_dataset with a model of several inputs (an image and per-example metadata): the
``prediction`` / ``correct`` columns and the scores equal direct calls with the metadata,
whether the metadata comes as ``additional_forward_args`` (cut per batch) or in
``((image, meta), label)`` batches."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from captum_ext.metrics import score_dataset, softmax_confidence
from captum_ext.metrics.trust import margin


class MetaNet(nn.Module):
    """forward(image, meta): the metadata decides the class on its own (a large weight)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)
        self.meta_head = nn.Linear(4, 5)
        with torch.no_grad():
            self.meta_head.weight.mul_(20)

    def forward(self, image, meta=None):
        if meta is None:  # a default, so that forgetting the metadata runs without an error
            meta = torch.zeros(image.shape[0], 4)
        return self.head(torch.relu(self.conv(image)).mean((2, 3))) + self.meta_head(meta)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MetaNet().eval()
    images = torch.randn(12, 3, 6, 6)
    meta = 4 * torch.randn(12, 4)
    labels = torch.randint(0, 5, (12,))
    with torch.no_grad():
        truth = model(images, meta).argmax(1)
        assert (truth != model(images).argmax(1)).any()  # the metadata matters
    return model, images, meta, labels, truth


class Pairs(Dataset):
    def __init__(self, images, meta, labels):
        self.images, self.meta, self.labels = images, meta, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i], self.meta[i]), self.labels[i]


@pytest.mark.parametrize("batch_size", [12, 5])
def test_score_kwargs_metadata_reaches_prediction_and_is_cut_per_batch(setup, batch_size):
    model, images, meta, labels, truth = setup
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    table = score_dataset(
        model,
        loader,
        ("softmax", "margin"),
        progress=False,
        score_kwargs={
            "softmax": {"additional_forward_args": meta},
            "margin": {"additional_forward_args": meta},
        },
    )
    # prediction: the arg-max of model(image, meta); correct: prediction == label
    assert torch.equal(table["prediction"], truth)
    assert torch.equal(table["correct"], truth == labels)
    expected = softmax_confidence(model, images, additional_forward_args=meta)
    assert torch.allclose(table["softmax"], expected, atol=1e-6)
    expected = margin(model, images, additional_forward_args=meta)
    assert torch.allclose(table["margin"], expected, atol=1e-5)


def test_top_level_additional_forward_args_with_shuffled_loader(setup):
    model, images, meta, labels, truth = setup
    # a shuffling loader is replaced by consecutive batches; rows still follow the dataset
    loader = DataLoader(TensorDataset(images, labels), batch_size=5, shuffle=True)
    table = score_dataset(
        model, loader, ("softmax",), progress=False, additional_forward_args=(meta,)
    )
    assert torch.equal(table["prediction"], truth)
    expected = softmax_confidence(model, images, additional_forward_args=meta)
    assert torch.allclose(table["softmax"], expected, atol=1e-6)


def test_tuple_input_batches(setup):
    model, images, meta, labels, truth = setup
    loader = DataLoader(Pairs(images, meta, labels), batch_size=5)
    table = score_dataset(model, loader, ("softmax",), progress=False)
    assert torch.equal(table["label"], labels)
    assert torch.equal(table["prediction"], truth)
    expected = softmax_confidence(model, (images, meta))
    assert torch.allclose(table["softmax"], expected, atol=1e-6)


def test_tensor_dataset_of_three_is_refused_with_the_supported_forms(setup):
    model, images, meta, labels, _ = setup
    loader = DataLoader(TensorDataset(images, meta, labels), batch_size=5)
    with pytest.raises(ValueError, match=r"\(\(input_1, input_2, \.\.\.\), labels\).*collate_fn"):
        score_dataset(model, loader, ("softmax",), progress=False)


def test_metadata_given_to_some_scores_only_is_refused(setup):
    model, images, meta, labels, _ = setup
    loader = DataLoader(TensorDataset(images, labels), batch_size=6)
    with pytest.raises(ValueError, match="additional_forward_args"):
        score_dataset(
            model,
            loader,
            ("softmax", "margin"),
            progress=False,
            score_kwargs={"softmax": {"additional_forward_args": meta}},
        )
    with pytest.raises(ValueError, match="give it once"):
        score_dataset(
            model,
            loader,
            ("softmax",),
            progress=False,
            score_kwargs={"softmax": {"additional_forward_args": meta}},
            additional_forward_args=meta,
        )
