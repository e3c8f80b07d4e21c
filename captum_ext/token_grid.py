r"""A vision transformer's patch tokens as a layer with an ``N x D x h x w`` output.

(The same for a channels-last ``(N, h, w, C)`` stage, as Swin transformers output.)

Captum's layer methods and ours (Grad-CAM, ContrastCAM, VOICE, LayerIBA, activation-matching
masks, ...) read a layer's output as a grid. A transformer block outputs ``(N, tokens, D)``:
``k`` leading tokens (the class token, DeiT's distillation token) then the ``h x w`` patch
tokens in row-major order. The CAM classes take a ``reshape_transform`` for that; the report
command, and any code that hands a method a *layer*, needs the grid to be a module's output.
The examples come first: a tokens-first ``(tokens, N, D)`` layer (``nn.TransformerEncoderLayer``
with its default ``batch_first=False``) is refused, not read as a grid of one token.

:class:`TokenGridModel` computes the model exactly as it is, except that while it runs, the
chosen layer's output passes through an identity module, ``TokenGridModel.grid``, as the
``(N, D, h, w)`` grid of its patch tokens, and is put back together after it (the leading
tokens untouched). Hooks on ``grid`` therefore see the patch tokens as a map, gradients with
respect to its output are the patch tokens' gradients folded the same way, and a method that
replaces its output (LayerIBA's bottleneck) replaces the patch tokens. A hook lives on the
user's layer only during the wrapper's forward pass.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from captum_ext._utils.hooks import call_hook, registered_hooks
from captum_ext._utils.layers import random_projection_score, resolve_layer
from captum_ext._utils.model_state import gradients_on, preserved_state
from captum_ext._utils.validation import ArgumentTypeError, check_examples_first, check_int

__all__ = [
    "TokenGridModel",
    "expose_token_grid",
    "grid_reaches_output",
    "looks_channels_last",
    "token_grid_shape",
]


class TokenGridModel(nn.Module):
    """``model`` with the ``(N, leading + h * w, D)`` output of ``layer`` (``layout=
    "tokens"``) or its ``(N, h, w, D)`` output (``layout="channels_last"``) passed through its
    identity module ``grid`` as ``(N, D, h, w)``. Build it with :func:`expose_token_grid`, which
    sets ``reaches_output`` (:func:`grid_reaches_output` on its example)."""

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        leading: int,
        grid_size: tuple,
        layout: str = "tokens",
    ) -> None:
        super().__init__()
        if layout not in ("tokens", "channels_last"):
            raise ValueError(f"`layout`={layout!r}: expected 'tokens' or 'channels_last'.")
        self.model = model
        self.grid = nn.Identity()
        self.leading = check_int(leading, "leading", minimum=0)
        self.grid_size = _check_grid_size(grid_size)
        self.layout = layout
        # not a submodule attribute: the layer is already registered inside `model`
        self._tokens_layer = [layer]
        self.training = model.training  # the wrapper is in the mode the model is in
        # grid_reaches_output on expose_token_grid's example (None: not checked)
        self.reaches_output: bool | None = None

    def _through_grid(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        h, w = self.grid_size
        if self.layout == "channels_last":
            if not isinstance(output, Tensor) or output.dim() != 4 or output.shape[1:3] != (h, w):
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(
                    f"the layer output {shape}; the grid expects (N, {h}, {w}, C): inputs of "
                    "another size need another grid (expose_token_grid on an example of that "
                    "size)."
                )
            return self.grid(output.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = self.leading + h * w
        if not isinstance(output, Tensor) or output.dim() != 3 or output.shape[1] != expected:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"the token layer output {shape}; the grid expects (N, {expected}, D) "
                f"({self.leading} leading tokens and {h} x {w} patches): inputs of another size "
                "need another grid (expose_token_grid on an example of that size)."
            )
        n, _, d = output.shape
        patches = output[:, self.leading :].reshape(n, h, w, d).permute(0, 3, 1, 2)
        grid = self.grid(patches)
        back = grid.permute(0, 2, 3, 1).reshape(n, h * w, d)
        return torch.cat([output[:, : self.leading], back], dim=1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with registered_hooks(call_hook(self._tokens_layer[0], self._through_grid)):
            return self.model(*args, **kwargs)


def _layer_output(model: nn.Module, layer: nn.Module, example: Tensor) -> tuple | str:
    """The shape of ``layer``'s output when ``model`` runs on ``example`` (in eval mode,
    without gradients; the model's modes, flags and buffers restored after), or, for an
    output that is not one tensor, a description of it (``"a tuple of a (1, 17, 32) tensor
    and a (1, 17, 17) tensor"``). A tensor output must have the example's N examples first
    (:func:`~captum_ext._utils.validation.check_examples_first`)."""
    seen: list[tuple | str] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        seen.append(tuple(output.shape) if isinstance(output, Tensor) else _describe(output))

    with registered_hooks(call_hook(layer, record)), preserved_state([model]), torch.no_grad():
        model.eval()
        model(example)
    if len(seen) != 1:
        raise ValueError(
            f"`layer` ran {len(seen)} times in one forward pass; pick a layer that runs once."
        )
    if isinstance(seen[0], tuple) and isinstance(example, Tensor) and example.dim():
        name = next((n for n, m in model.named_modules() if m is layer and n), None)
        label = f"{name!r} ({type(layer).__name__})" if name else type(layer).__name__
        check_examples_first(
            seen[0], example.shape[0], what=f"`layer` {label} output", remedy="as_is"
        )
    return seen[0]


def _describe(output: Any) -> str:
    """A short description of a layer output that is not one tensor."""
    if isinstance(output, (tuple, list)):
        items = [
            f"a {tuple(item.shape)} tensor"
            if isinstance(item, Tensor)
            else "None"
            if item is None
            else f"a {type(item).__name__}"
            for item in output
        ]
        if not items:
            return f"an empty {type(output).__name__}"
        listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"
        return f"a {type(output).__name__} of {listed}"
    return f"a {type(output).__name__}"


def layer_output_shape(model: nn.Module, layer: nn.Module, example: Tensor) -> tuple:
    """The shape of ``layer``'s output when ``model`` runs on ``example`` (in eval mode,
    without gradients; the model's modes, flags and buffers restored after); ``()`` for an
    output that is not one tensor (a tuple).

    Raises:
        ValueError: the layer ran more than once, or its output does not have the example's
            N examples first (a tokens-first ``(tokens, N, D)`` layer, ``batch_first=False``).
    """
    seen = _layer_output(model, layer, example)
    return seen if isinstance(seen, tuple) else ()


def token_grid_shape(tokens: int) -> tuple[int, tuple[int, int]] | None:
    """``(leading, (h, w))`` for ``tokens`` = leading + a square grid of at least 2 x 2
    patches, with 0, 1 (class token) or 2 (class and distillation tokens) leading tokens;
    None otherwise (a single token is no grid: pass ``grid_size`` for a 1 x 1 one)."""
    for leading in (1, 0, 2):
        side = math.isqrt(max(tokens - leading, 0))
        if side > 1 and side * side == tokens - leading:
            return leading, (side, side)
    return None


def _check_grid_size(grid_size: Any) -> tuple[int, int]:
    """``grid_size`` as a pair ``(h, w)`` of positive ints, refused by name otherwise."""
    if not isinstance(grid_size, (tuple, list)):
        raise ArgumentTypeError(
            "`grid_size` must be a pair (h, w) of positive ints, got "
            f"{type(grid_size).__name__} {grid_size!r}."
        )
    if len(grid_size) != 2:
        raise ValueError(
            f"`grid_size` must be a pair (h, w) of positive ints, got {tuple(grid_size)!r}."
        )
    return (check_int(grid_size[0], "grid_size[0]"), check_int(grid_size[1], "grid_size[1]"))


LARGEST_PATCH = 32
"""The largest patch, in pixels, that grid inference considers: vision transformers' patches
(and hierarchical stages' strides) are 4 to 32 pixels. Larger cells are taken only
through ``grid_size``."""


def _image_grid_layouts(
    tokens: int, image_size: tuple[int, int], leadings: tuple[int, ...] = (1, 0, 2)
) -> tuple[list[tuple[int, tuple[int, int]]], list[tuple[int, tuple[int, int]]]]:
    """``(exact, rounded)``: the ``(leading, (h, w))`` with ``leading`` in ``leadings`` and
    ``h * w = tokens - leading >= 2`` patches whose grid fits images of ``image_size``
    ``(H, W)`` with square patches of ``p <= LARGEST_PATCH`` pixels: exactly (``H = h p``,
    ``W = w p``, the rule of the CAMs' token check), or with the remainder dropped or padded
    (``h = floor(H / p)`` or ``ceil(H / p)``, the same for ``w``, ``p >= 2``)."""
    height, width = (int(side) for side in image_size)
    shapes = []
    for leading in leadings:
        patches = tokens - leading
        if patches < 2:
            continue
        for h in range(1, patches + 1):
            if patches % h == 0:
                shapes.append((leading, (h, patches // h)))

    def exact(h: int, w: int) -> bool:
        return height % h == 0 and width % w == 0 and height // h == width // w <= LARGEST_PATCH

    def rounded(h: int, w: int) -> bool:
        return any(
            (height // p, width // p) == (h, w) or (-(-height // p), -(-width // p)) == (h, w)
            for p in range(2, LARGEST_PATCH + 1)
        )

    return (
        [shape for shape in shapes if exact(*shape[1])],
        [shape for shape in shapes if rounded(*shape[1])],
    )


def looks_channels_last(shape: tuple, input_size: tuple) -> bool:
    """Whether a 4-D layer output ``shape`` is channels-last ``(N, h, w, C)`` rather than
    ``(N, C, h, w)`` for inputs of spatial ``input_size`` ``(H, W)``: its dims 1 and 2 keep
    the input's aspect ratio and dims 2 and 3 do not (a square grid of C == h == w channels
    counts as channels-first)."""
    if len(shape) != 4 or len(input_size) != 2:
        return False
    aspect = input_size[0] / input_size[1]

    def keeps(h: int, w: int) -> bool:
        return w > 0 and abs(h / w - aspect) <= 0.25 * aspect

    return keeps(shape[1], shape[2]) and not keeps(shape[2], shape[3])


def expose_token_grid(
    model: nn.Module,
    layer: str | nn.Module,
    example: Tensor,
    *,
    leading: int | None = None,
    grid_size: tuple[int, int] | None = None,
) -> TokenGridModel:
    r"""A :class:`TokenGridModel` of ``model`` at a token ``layer``, its ``grid`` the layer
    to give to a layer method.

    A 3-D ``(N, tokens, D)`` output is split into ``leading`` tokens and an ``h x w`` grid of
    patches; a 4-D output is read as a channels-last ``(N, h, w, C)`` grid (the stages of
    torchvision's Swin transformers), and ``leading`` and ``grid_size`` do not apply.

    Args:
        model (nn.Module): an eager model (a vision transformer).
        layer (str or nn.Module): the token layer, ``(N, tokens, D)`` output (the examples
            first: a tokens-first ``(tokens, N, D)`` layer is refused).
        example (Tensor): a small input batch of the size to be explained; the layer's output
            on it gives the number of tokens.
        leading (int, optional): tokens (>= 0) before the patches (1 for a class token, 2
            with DeiT's distillation token). Default: inferred with ``grid_size``.
        grid_size (tuple[int, int], optional): ``(h, w)`` patches, positive ints. Default:
            inferred from the token count and the example's ``H x W``: 0, 1 or 2 leading
            tokens (only ``leading`` when given) before a grid of square patches, that is a
            square grid of at least 2 x 2 patches for square images (and for an example that
            is not an ``(N, C, H, W)`` image), and for non-square images the one ``h x w``
            grid with ``H / h == W / w`` and patches of at most ``LARGEST_PATCH`` (32)
            pixels (where none divides the image, the one grid that tiles it with the
            remainder dropped or padded, or the square grid of a model that resizes its
            input, if only one of them is possible). Pass it when the tokens do not tile the
            example as the patches of the image (a model that resizes its input).

    Returns:
        TokenGridModel: computes what ``model`` computes; ``.grid`` is the layer.

    Raises:
        ValueError: the layer's output is not one 3-D tensor, or its first dimension is not
            the example's N examples (a tokens-first ``(tokens, N, D)`` layer, as
            ``nn.TransformerEncoderLayer`` gives with its default ``batch_first=False``:
            build the model with ``batch_first=True``, or use a CAM class with a
            ``reshape_transform`` that moves the examples first), or its token count does
            not match the grid, or no grid or more than one can be inferred (pass
            ``leading`` and ``grid_size``); ``leading`` is negative or ``grid_size`` is not
            two positive ints (``TypeError`` for the wrong types).

    Examples::

        >>> from torchvision.models import VisionTransformer
        >>> from captum_ext.attr import GradCAM
        >>> from captum_ext.token_grid import expose_token_grid
        >>> vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16,
        ...                         mlp_dim=32, num_classes=5).eval()
        >>> _ = torch.nn.init.normal_(vit.heads.head.weight)  # torchvision's fresh head is 0
        >>> x = torch.randn(3, 3, 32, 32)
        >>> wrapped = expose_token_grid(vit, "encoder.layers.encoder_layer_1.ln_1", x[:1])
        >>> (wrapped.leading, wrapped.grid_size)
        (1, (4, 4))
        >>> maps = GradCAM(wrapped, wrapped.grid).attribute(x, target=[0, 1, 2])
        >>> tuple(maps.shape)
        (3, 1, 4, 4)
        >>> bool(torch.equal(wrapped(x), vit(x)))
        True
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        raise TypeError("`model` must be an eager nn.Module (hooks cannot reach into TorchScript).")
    if leading is not None:
        leading = check_int(leading, "leading", minimum=0)
    if grid_size is not None:
        grid_size = _check_grid_size(grid_size)
    module = resolve_layer(model, layer)
    shape = _layer_output(model, module, example)
    if isinstance(shape, str):
        raise ValueError(
            f"`layer` outputs {shape}, not one (N, tokens, D) tensor; expose_token_grid needs a "
            "module whose output is the tokens (for a block's attention, nn.MultiheadAttention, "
            "whose output is (tokens, weights), take the norm before it, e.g. the block's "
            "`ln_1` / `norm1`)."
        )
    if len(shape) == 4 and leading is None and grid_size is None:
        if not looks_channels_last(shape, tuple(example.shape[-2:])):
            raise ValueError(
                f"`layer` outputs {shape}, which reads as (N, C, h, w) already for inputs of "
                f"{tuple(example.shape[-2:])}: give the layer itself to the method."
            )
        return _checked(
            TokenGridModel(model, module, 0, shape[1:3], layout="channels_last"), example
        )
    if len(shape) != 3:
        raise ValueError(
            f"`layer` outputs {shape}, not (N, tokens, D) (or a channels-last (N, h, w, C), "
            "without `leading` and `grid_size`); expose_token_grid is for the token layers "
            "of vision transformers."
        )
    tokens = shape[1]
    if grid_size is None:
        leading, grid_size = _infer_grid(tokens, example, leading)
    elif leading is None:
        leading = tokens - grid_size[0] * grid_size[1]
    h, w = grid_size
    if leading < 0 or h < 1 or w < 1 or leading + h * w != tokens:
        raise ValueError(
            f"`leading`={leading} and `grid_size`={tuple(grid_size)} make {leading + h * w} "
            f"tokens, but `layer` outputs {tokens}."
        )
    return _checked(TokenGridModel(model, module, leading, (h, w)), example)


def _infer_grid(tokens: int, example: Tensor, leading: int | None) -> tuple[int, tuple[int, int]]:
    """``(leading, (h, w))`` of ``tokens`` for :func:`expose_token_grid` without
    ``grid_size`` (``leading`` given or None). For a square example, or one that is not an
    ``(N, C, H, W)`` image: the square grid of at least 2 x 2 patches (a square image's
    grids of square patches are square). For a non-square image: the one grid of square
    patches of at most ``LARGEST_PATCH`` pixels that tiles its ``H x W``
    (:func:`_image_grid_layouts`); where none does, the one that tiles it with the remainder
    dropped or padded, or the square grid of a model that resizes its input, if only one of
    them is possible. Several grids, or none, are refused."""
    image = (
        tuple(example.shape[-2:]) if isinstance(example, Tensor) and example.dim() == 4 else None
    )
    leadings = (1, 0, 2) if leading is None else (leading,)
    given = "" if leading is None else f"`leading`={leading} leaves {tokens - leading} of "
    square = None
    for count in leadings:
        side = math.isqrt(max(tokens - count, 0))
        if side > 1 and side * side == tokens - count:
            square = (count, (side, side))
            break
    if image is None or image[0] == image[1]:
        if square is not None:
            return square
        if leading is None:
            raise ValueError(
                f"`layer` outputs {tokens} tokens, not 0-2 leading tokens and a square grid of "
                "at least 2 x 2 patches; pass `leading` and `grid_size`=(h, w)."
            )
        raise ValueError(
            f"{given}the layer's {tokens} tokens, not a square grid of at least 2 x 2 "
            "patches; pass `grid_size`=(h, w)."
        )
    exact, rounded = _image_grid_layouts(tokens, image, leadings)
    squares = [square] if square is not None else []
    # no exact tiling: a remainder dropped or padded, or a model that resizes its input;
    # the image cannot tell the two apart, so where both fit the choice is the user's
    fits = exact or rounded + [grid for grid in squares if grid not in rounded] or squares
    if len(fits) == 1:
        return fits[0]
    what = (
        f"`layer` outputs {tokens} tokens"
        if leading is None
        else f"{given}the layer's {tokens} tokens"
    )
    if not fits:
        reason = (
            f"no grid of square patches after {'0-2' if leading is None else leading} leading "
            f"tokens fits the example's {image[0]} x {image[1]} images"
        )
    else:
        listed = ", ".join(f"{count} leading and {h} x {w}" for count, (h, w) in fits)
        reason = f"several grids fit the example's {image[0]} x {image[1]} images ({listed})"
    raise ValueError(f"{what}: {reason}; pass `leading` and `grid_size`=(h, w).")


def _checked(wrapped: TokenGridModel, example: Tensor) -> TokenGridModel:
    wrapped.reaches_output = grid_reaches_output(wrapped, example)
    if wrapped.reaches_output is False:
        warnings.warn(
            "the patch tokens of `layer` do not reach the model's output (their gradients are "
            "exactly zero), so every gradient-based map on the grid is zero. After a vision "
            "transformer's last block only the class token is read: expose the block's first "
            "norm instead (`encoder.layers.encoder_layer_<last>.ln_1` in torchvision, "
            "`blocks[-1].norm1` in timm). A freshly built torchvision ViT has an all-zero "
            "head: load trained weights.",
            stacklevel=3,
        )
    return wrapped


def grid_reaches_output(wrapped: TokenGridModel, example: Tensor) -> bool | None:
    r"""Whether the grid (the patch tokens) changes ``wrapped``'s output on ``example``.

    .. code-block:: text

        reaches = any( d <r, f(x)> / d grid != 0 ),   r ~ N(0, I) fixed (seed 0)

    One backward pass of a fixed random projection of the output to the grid, in eval mode
    (the model's modes, flags and buffers restored after, its parameters' ``.grad``
    untouched). A random projection rather than the sum: the sum of a softmax output is
    constant.

    Args:
        wrapped (TokenGridModel): from :func:`expose_token_grid`.
        example (Tensor): a small input batch of the size to be explained.

    Returns:
        bool or None: False when every gradient at the grid is exactly zero (after a vision
        transformer's last block only the class token is read; a freshly built torchvision
        ViT has an all-zero head); None when the output is not a floating-point tensor.

    Example::

        >>> from torchvision.models import VisionTransformer
        >>> from captum_ext.token_grid import expose_token_grid, grid_reaches_output
        >>> vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16,
        ...                         mlp_dim=32, num_classes=5).eval()
        >>> _ = torch.nn.init.normal_(vit.heads.head.weight)
        >>> x = torch.randn(1, 3, 32, 32)
        >>> grid_reaches_output(expose_token_grid(vit, "encoder.layers.encoder_layer_1.ln_1", x), x)
        True
    """
    store: dict[str, Tensor] = {}

    def leaf(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        store["grid"] = output.detach().requires_grad_()
        return store["grid"]

    hooked = registered_hooks(call_hook(wrapped.grid, leaf))
    with hooked, preserved_state([wrapped.model]), gradients_on():
        wrapped.model.eval()
        output = wrapped(example)
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return None
        score = random_projection_score(output)
        if not score.requires_grad:
            return False
        (gradient,) = torch.autograd.grad(score, store["grid"], allow_unused=True)
    return gradient is not None and bool(gradient.ne(0).any())
