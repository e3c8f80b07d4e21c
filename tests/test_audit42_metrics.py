"""Audit 42: metrics fed by Captum pipelines (pointing game boxes vs layer-sized maps)."""

import pytest
import torch

from captum_ext.metrics import energy_pointing_game, pointing_game


def _cams() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 1, 7, 7)  # a layer-resolution map, as LayerGradCam gives


@pytest.mark.parametrize("game", [pointing_game, energy_pointing_game])
def test_boxes_in_image_pixels_on_layer_sized_maps_are_refused(game):
    """Boxes of a 28 x 28 image on 7 x 7 CAMs were read as map pixels and clipped: a
    quarter of the image became the whole map and every map 'hit'."""
    boxes = torch.tensor([[0, 0, 14, 14]] * 3)
    with pytest.raises(ValueError, match=r"example\(s\) \[0, 1, 2\] reaches past the 7 x 7") as e:
        game(_cams(), boxes)
    assert "LayerAttribution.interpolate" in str(e.value)
    with pytest.raises(ValueError, match=r"example\(s\) \[1\]"):
        game(_cams(), torch.tensor([[0, 0, 7, 7], [-1, 0, 3, 3], [2, 2, 4, 4]]))


def test_boxes_inside_the_maps_still_score_as_before():
    maps = torch.zeros(2, 7, 7)
    maps[0, 6, 6] = 1.0  # maximum in the last pixel: a box with x1 = y1 = 7 (exclusive) holds it
    maps[1, 0, 0] = 1.0
    boxes = torch.tensor([[5, 5, 7, 7], [1, 1, 7, 7]])
    assert pointing_game(maps, boxes).tolist() == [True, False]
    assert energy_pointing_game(maps, boxes).tolist() == [1.0, 0.0]


def test_image_sized_masks_on_layer_sized_maps_say_to_upsample():
    masks = torch.zeros(3, 28, 28, dtype=torch.bool)
    masks[:, :14, :14] = True
    with pytest.raises(ValueError, match=r"the maps are 7 x 7: give them at the masks' size"):
        pointing_game(_cams(), masks)


# --------------------------------------------------------------------------------------------
# a model hidden behind a plain function, as the segmentation error message suggests


def _segmenter() -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout2d(0.5),
        nn.Conv2d(8, 4, 1),
    ).train()  # evaluated mid-training


def _state(model):
    return [m.training for m in model.modules()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("metric", ["deletion", "road", "soundness"])
def test_a_train_mode_model_behind_a_lambda_is_evaluated_in_eval_mode(metric):
    """The metrics put a model they can name in eval mode; behind ``lambda x: model(x)...``
    (what their own error message for segmentation outputs suggests) a train-mode model ran
    with dropout and batch statistics: other scores on every call and for every batch size."""
    from captum_ext import metrics

    seg = _segmenter()
    torch.manual_seed(1)
    x, maps = torch.randn(3, 3, 16, 16), torch.rand(3, 1, 16, 16)
    kwargs = {"target": 1}
    if metric == "deletion":
        kwargs |= {"n_steps": 8}
    if metric != "deletion":
        kwargs |= {"noise": 0.0}

    def run(forward, **extra):
        out = getattr(metrics, metric)(forward, x, maps, **kwargs, **extra)
        if isinstance(out, torch.Tensor):
            return out
        return out.probability if metric == "road" else torch.cat([out.score, out.soundness])

    flags, buffers = _state(seg)
    hidden = run(lambda z: seg(z).mean(dim=(2, 3)))
    again = run(lambda z: seg(z).mean(dim=(2, 3)))
    after_flags, after_buffers = _state(seg)
    assert after_flags == flags  # still in train mode afterwards
    for before, after in zip(buffers, after_buffers, strict=True):
        assert torch.equal(before, after)

    class Pooled(torch.nn.Module):  # the same model, visible to the metric
        def __init__(self):
            super().__init__()
            self.seg = seg

        def forward(self, z):
            return self.seg(z).mean(dim=(2, 3))

    visible = run(Pooled())
    torch.testing.assert_close(hidden, again, rtol=0, atol=0)
    torch.testing.assert_close(hidden, visible, rtol=0, atol=0)
    if metric == "deletion":
        other_batch = run(lambda z: seg(z).mean(dim=(2, 3)), batch_size=5)
        torch.testing.assert_close(hidden, other_batch)


def test_a_dict_output_names_its_keys_and_a_remedy_that_works():
    """A torchvision segmentation model returns {"out": ...}; the error suggested
    ``model(x).mean(dim=(2, 3))``, which fails on a dict."""
    from captum_ext.metrics import deletion

    seg = _segmenter().eval()

    def as_dict(z):
        return {"out": seg(z), "aux": seg(z)}

    x, maps = torch.randn(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    with pytest.raises(
        ValueError, match=r"keys 'out', 'aux'.*lambda \*args: model\(\*args\)\['out'\]"
    ):
        deletion(as_dict, x, maps, target=1, n_steps=4)
    scores = deletion(lambda z: as_dict(z)["out"].mean(dim=(2, 3)), x, maps, target=1, n_steps=4)
    assert scores.shape == (2,) and bool(torch.isfinite(scores).all())


def test_boxes_rescaled_in_floating_point_are_taken():
    """A whole-image box of a 26 px image rescaled to 7 x 7 maps in float32 ends at
    7.0000005: refused by the first version of the check above."""
    box = torch.tensor([[0.0, 0.0, 26.0, 26.0]]) * (7 / 26)
    assert float(box[0, 2]) > 7
    maps = torch.zeros(1, 1, 7, 7)
    maps[0, 0, 6, 6] = 1.0
    assert pointing_game(maps, box).tolist() == [True]
    assert energy_pointing_game(maps, torch.tensor([[-0.3, 0.0, 7.4, 7.0]])).tolist() == [1.0]


class _ReadsAChildsFlag(torch.nn.Module):
    """A forward that uses a child's buffers and flag without running the child, as
    hand-written code does with ``F.batch_norm(..., training=self.bn.training)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.conv(x)
        h = torch.nn.functional.batch_norm(
            h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
            training=self.bn.training,
        )  # fmt: skip
        return self.head(h.relu().mean(dim=(2, 3)))


def test_a_hidden_model_reading_a_childs_flag_runs_as_in_eval_mode():
    from captum_ext.metrics import deletion

    model = _ReadsAChildsFlag().train()
    torch.manual_seed(1)
    x, maps = torch.randn(4, 3, 8, 8), torch.rand(4, 1, 8, 8)
    hidden = deletion(lambda z: model(z), x, maps, target=0, n_steps=4)
    assert all(m.training for m in model.modules())  # put back
    one_at_a_time = deletion(lambda z: model(z), x, maps, target=0, n_steps=4, batch_size=1)
    visible = deletion(model, x, maps, target=0, n_steps=4)
    torch.testing.assert_close(hidden, visible)
    torch.testing.assert_close(hidden, one_at_a_time)
