"""ActivationMatchingMask and models with several inputs: refused with an error that says
why (no additional_forward_args; a closure over per-example tensors is misaligned, since
the model also runs on subsets of the images) and what works (one image per call)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from captum_ext.attr import ActivationMatchingMask


class MetaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, image, meta):
        a = torch.relu(self.conv(image)) * torch.sigmoid(self.gate(meta))[:, :, None, None]
        return self.head(a.mean((2, 3)))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    return MetaNet().eval(), torch.randn(3, 3, 8, 8), torch.randn(3, 2)


def test_tuple_inputs_refused_naming_the_cause_and_the_way(setup):
    model, images, meta = setup
    explainer = ActivationMatchingMask(model, [model.conv])
    with pytest.raises(ValueError, match=r"several inputs.*subsets.*one image per call"):
        explainer.attribute((images, meta), mode="per_image", steps=1, progress=False)


def test_fit_on_several_input_batches_refused(setup):
    model, images, meta = setup

    class Pairs(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return (images[i], meta[i]), 0

    explainer = ActivationMatchingMask(lambda x: model(x, meta[: len(x)]), [model.conv])
    with pytest.raises(ValueError, match=r"`data`.*several inputs.*not supported"):
        explainer.fit(DataLoader(Pairs(), batch_size=3), epochs=1, progress=False)


def test_one_image_per_call_sees_only_its_own_metadata(setup):
    # the documented way: per image, its metadata repeated to every row the model gets
    model, images, meta = setup
    for i in range(images.shape[0]):
        seen = []

        def forward(x, i=i, seen=seen):
            seen.append(x.shape[0])
            return model(x, meta[i : i + 1].expand(len(x), *meta.shape[1:]))

        explainer = ActivationMatchingMask(forward, [model.conv])
        result = explainer.attribute(
            images[i : i + 1],
            mode="per_image",
            steps=3,
            restarts=1,
            prune=True,
            return_details=True,
            progress=False,
        )
        assert result.mask.shape == (1, 1, 8, 8)
        # its prediction is the model's on (image i, meta i)
        expected = model(images[i : i + 1], meta[i : i + 1]).argmax(1)
        assert torch.equal(result.prediction, expected)
        assert set(seen) <= {1}  # every call held image i (or its explanations) only
