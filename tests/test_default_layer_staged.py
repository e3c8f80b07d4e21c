"""default_cam_layer on staged models (several runs of numbered blocks) and on convolutional
networks whose blocks name their first norm ``norm1``.

The pre-norm rule exists for vision transformers: after the last block only the class token
is read, so the last block's first norm is the last layer whose patch tokens reach the
output. It took the longest run of numbered blocks (in a staged model: a middle stage, not
the last one that runs) and fired on any block with a ``norm1``, convolutional or not, and
``captum-ext report`` called that layer "the last transformer block's first norm". Module
trees with the libraries' names stand in for timm and Hugging Face (not dependencies)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_ext.data import default_cam_layer

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# convolutional blocks named like pre-norm blocks: no transformer, no pre-norm layer


class PreActBottleneck(nn.Module):
    """timm's ResNetV2 (BiT) block: norm1 -> conv1 -> norm2 -> conv2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.norm2 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)


class ResNetStage(nn.Module):
    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[PreActBottleneck(channels) for _ in range(depth)])


class ResNetV2(nn.Module):
    """timm's class name and layout: stages of (3, 4, 6, 3) blocks, a final norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.stages = nn.Sequential(*[ResNetStage(8, d) for d in (3, 4, 6, 3)])
        self.norm = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 10)


class PoolFormerBlock(nn.Module):
    """timm's MetaFormer (PoolFormer) block: its token mixer is a pooling, not attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.token_mixer = nn.AvgPool2d(3, 1, 1)
        self.norm2 = nn.GroupNorm(1, channels)
        self.mlp = nn.Conv2d(channels, channels, 1)


class MetaFormer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            *[nn.Sequential(*[PoolFormerBlock(8) for _ in range(d)]) for d in (2, 2, 6, 2)]
        )
        self.head = nn.Linear(8, 10)


class SeparableBlock(nn.Module):
    """A depthwise-separable residual block: conv_dw -> norm1 -> act -> conv_pw -> norm2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm1 = nn.GroupNorm(4, channels)
        self.act = nn.GELU()
        self.conv_pw = nn.Conv2d(channels, channels, 1)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x):
        return x + self.norm2(self.conv_pw(self.act(self.norm1(self.conv_dw(x)))))


class ThreeStageCNN(nn.Module):
    """Three stages of (1, 2, 2) separable blocks, each after a stride-2 convolution, so the
    stages' maps are 32 x 32, 16 x 16 and 8 x 8 for a 32 x 32 image."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(8, 8, 3, stride=1 if i == 0 else 2, padding=1),
                    nn.Sequential(*[SeparableBlock(8) for _ in range(depth)]),
                )
                for i, depth in enumerate((1, 2, 2))
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


@pytest.mark.parametrize("build", [ResNetV2, MetaFormer, ThreeStageCNN])
def test_convolutional_blocks_with_a_norm1_get_no_transformer_layer(build):
    """Their blocks hold convolutions (or a pooling token mixer) and no attention: they are
    no transformer's, so the pre-norm rule does not apply, and a model of no known family gets
    None (the report then asks for `--layer`, naming the last convolutions). Before: the
    longest run's last norm1, e.g. `stages.2.blocks.5.norm1` of the ResNetV2, a block in the
    third of four stages."""
    assert default_cam_layer(build()) is None


# ---------------------------------------------------------------------------------------
# staged transformers: the last stage's last block


class SwinLayer(nn.Module):
    """A Hugging Face Swin block (names of transformers' SwinLayer)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(channels)
        self.attention = nn.Identity()
        self.layernorm_after = nn.LayerNorm(channels)


class SwinStage(nn.Module):
    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SwinLayer(channels) for _ in range(depth)])


class SwinEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SwinStage(8, d) for d in (2, 2, 6, 2)])


class SwinModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Identity()
        self.encoder = SwinEncoder()
        self.layernorm = nn.LayerNorm(8)


class SwinForImageClassification(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.swin = SwinModel()
        self.classifier = nn.Linear(8, 10)


def test_a_staged_swin_gets_its_last_stages_last_block():
    """Swin's four stages run in turn, (2, 2, 6, 2) blocks: the last block that runs is
    block 1 of stage 3, whose first norm's output still reaches the head at every position
    (through the final layernorm and the mean pooling). Before: the third stage's block 5
    (the longest run), two merges (four times the resolution) before the head."""
    model = SwinForImageClassification()
    assert default_cam_layer(model) == "swin.encoder.layers.3.blocks.1.layernorm_before"


class MultiheadBlock(nn.Module):
    """A pre-norm block whose attention is torch's nn.MultiheadAttention (under any name)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.mixer = nn.MultiheadAttention(channels, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Linear(channels, channels)


class HybridNet(nn.Module):
    """Convolutional stages of norm1 blocks, then attention stages of norm1 blocks (as
    CoAtNet or CAFormer): the last attention stage's last block, never a conv block."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(*[PreActBottleneck(8) for _ in range(6)]),
            nn.Sequential(*[MultiheadBlock(8) for _ in range(2)]),
            nn.Sequential(*[MultiheadBlock(8) for _ in range(3)]),
        )
        self.head = nn.Linear(8, 10)


def test_a_hybrid_gets_its_last_attention_block():
    with torch.device("meta"):
        model = HybridNet()
    assert default_cam_layer(model) == "stages.2.2.norm1"


def test_a_channel_attention_gate_is_no_transformer():
    """CBAM-style gates (ChannelAttention, SpatialAttention) in a conv block mix no tokens."""

    class ChannelAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Conv2d(8, 8, 1)

    class GatedBlock(PreActBottleneck):
        def __init__(self, channels: int) -> None:
            super().__init__(channels)
            self.channel_attention = ChannelAttention()

    model = nn.Module()
    model.blocks = nn.Sequential(*[GatedBlock(8) for _ in range(3)])
    assert default_cam_layer(model) is None


def test_timm_style_vit_blocks_of_another_class_keep_their_last_blocks_first_norm():
    """timm's Beit, Eva, DeiT3 ...: blocks.<i>.norm1 beside an ``attn`` holding ``qkv``."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn, self.norm2 = nn.LayerNorm(8), Attention(), nn.LayerNorm(8)

    Beit = type("Beit", (nn.Module,), {})
    model = Beit()
    model.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
    model.blocks = nn.Sequential(*[Block() for _ in range(12)])
    model.norm = nn.LayerNorm(8)
    assert default_cam_layer(model) == "blocks.11.norm1"


def test_the_report_asks_for_a_layer_of_a_three_stage_cnn():
    """`captum-ext report` without `--layer` explained `stages.1.1.1.norm1` (a block of the
    middle, 16 x 16 stage) as "the last transformer block's first norm"; it now asks for
    `--layer`, naming the last convolutions."""
    from captum_ext.viz.build import pick_layer

    with pytest.raises(ValueError, match=r"`--layer` is required for a ThreeStageCNN model"):
        pick_layer(ThreeStageCNN(), None)
