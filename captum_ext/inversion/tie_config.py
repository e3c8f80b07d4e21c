"""TIEConfig: the training settings of :class:`~captum_ext.inversion.TIE`, in one object."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from captum_ext._utils.validation import (
    check_flag,
    check_int,
    check_number,
    is_integer,
    is_real,
)

__all__ = ["GARBAGE_NOISE_KINDS", "TIE_BASELINES", "TIEConfig"]

#: What is excluded into the garbage pool each epoch: ``"uncertain"`` (TIE: the inverted
#: samples with ``UE > threshold``) or ``"all"`` (the earlier version: every inverted sample).
TIE_BASELINES: tuple[str, ...] = ("uncertain", "all")

#: How the noise images seeding the garbage pool are drawn: ``"pixel_range"`` (varied noise
#: over the whole pixel range, then the model's preprocessing) or ``"data_stats"`` (the
#: earlier default: ``N(mean, std^2)`` of the preprocessed inputs, per channel).
GARBAGE_NOISE_KINDS: tuple[str, ...] = ("pixel_range", "data_stats")


def _float_in(value: Any, argument: str, low: float, high: float) -> float:
    if not is_real(value) or not low <= value <= high:
        raise ValueError(f"`{argument}` must be a number in [{low}, {high}], got {value!r}.")
    return float(value)


class _FrozenWeights(Mapping):
    """Loss weights that cannot change after the config is built (the config is frozen and
    hashable; a dict inside it was neither)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self._weights = {str(name): float(value) for name, value in weights.items()}

    def __getitem__(self, name: str) -> float:
        return self._weights[name]

    def __iter__(self):
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._weights.items())))

    def __repr__(self) -> str:
        return repr(self._weights)

    def __deepcopy__(self, memo: dict) -> _FrozenWeights:
        return self


@dataclass(frozen=True)
class TIEConfig:
    r"""How :class:`~captum_ext.inversion.TIE` trains: every setting that does not describe
    the model (the model, its number of classes, input shape and preprocessing are
    arguments of ``TIE`` itself).

    A frozen dataclass, checked when built; derive variants with
    ``dataclasses.replace(config, threshold=0.3)`` or :meth:`replace`, and store it with
    :meth:`to_dict` / :meth:`from_dict`.

    Args:
        threshold (float, optional): UE above which an inverted sample is excluded into the
            garbage pool, in [0, 1]. Default: 0.5
        stop_fraction (float, optional): Stop when the excluded fraction of an epoch is
            below this, in [0, 1]. Default: 0.05
        baseline (str, optional): ``"uncertain"`` (TIE) or ``"all"`` (every inverted sample
            is excluded; never stops early). Default: ``"uncertain"``
        garbage_size (int, optional): Number of noise images seeding the pool.
            Default: None, the in-distribution size divided by ``n`` (an average class).
        garbage_noise (str, optional): How the seeding noise is drawn (see
            :class:`~captum_ext.inversion.TIE`): ``"pixel_range"`` (white Gaussian, uniform
            and low-frequency noise of random brightness and contrast over the whole pixel
            range ``value_range``, mapped by ``preprocess``) or ``"data_stats"`` (the
            earlier default: Gaussian noise with the preprocessed inputs' per-channel mean
            and std, which covers only images as dark as the average input).
            Default: ``"pixel_range"``
        garbage_strokes (float, optional): Share of the seeds drawn as random pen scribbles
            (:func:`~captum_ext.inversion.pen_strokes`) instead of ``garbage_noise``
            noise, in [0, 1]: structured seeds, so that the garbage class also absorbs
            stroke-like images (glyphs, symbols) rather than only textures. Not in the
            paper, which seeds with noise. Default: 0.0
        garbage_transforms (float, optional): Share of the seeds drawn as mirrored,
            upside-down or quarter-turned copies of the training inputs
            (:func:`~captum_ext.inversion.transformed_inputs`; copies correlated 0.6 or
            more with their source are dropped), in [0, 1], at most
            ``1 - garbage_strokes``: seeds that look like the data but are no class of it,
            so that the garbage class also takes near out-of-distribution images. Not in
            the paper. On the bundled digit model, half of a doubled pool moved rendered
            letters from AUROC 0.93 to 0.95-0.96 at 0.3 to 1.0 points of held-out accuracy
            (``benchmarks/RESULTS.md``). Default: 0.0
        garbage_weight (float, optional): Factor on the garbage class's weight in the
            classifier's class-weighted cross-entropy, ``> 0``: ``1`` gives it the weight of
            an average class (inverse frequency, the paper's balancing); smaller values let
            the pool pull less on the in-distribution classes. Our DEFAULT 0.5: on the
            bundled digit model it keeps the held-out accuracy within 0.3 points of the
            plain model (1 gave 0.3 to 1.2 points less over three seeds) and still sends all
            noise and natural crops to the garbage class (``benchmarks/ood.py``).
            Default: 0.5
        samples_per_class (int, optional): Inverted images sampled per class and epoch.
            Default: None, ``ceil(N / (n (n + 1)))``: an average class's worth in all.
        sample_vector (str, optional): ``"one_hot"`` or ``"soft"`` conditioning of the
            sampled images (see :class:`~captum_ext.inversion.TIE`). Default: ``"one_hot"``
        final_training (bool, optional): Train the model one more epoch on the final pool
            when a fit ends after an epoch that added samples. Default: True
        lr (float, optional): Adam learning rate of the model. Default: 1e-3
        batch_size (int, optional): Training examples per forward (per process). Default: 64
        generator_steps (int, optional): Generator steps per epoch. Default: 100
        generator_batch_size (int, optional): Generated images per generator step (per
            process), >= 2. Default: 64
        generator_lr (float, optional): Adam learning rate of the generator. Default: 1e-3
        inversion_weights (dict, optional): Loss weights for
            :class:`~captum_ext.inversion.NetworkInversion` (default KL 1, CE 1, cosine 0.5;
            orthogonality off). Default: None
        latent_dim (int, optional): ``z`` size of the default generator. Default: 100
        generator_width (int, optional): Width of the default generator. Default: 64
        dropout (float, optional): Stage-B dropout of the default generator. Default: 0.1
        seed (int, optional): Seeds the garbage row, the generator, the noise images, the
            data order, dropout and the sampling. Default: 0

    Examples::

        >>> from captum_ext.inversion import TIEConfig
        >>> quick = TIEConfig(generator_steps=20, batch_size=32)
        >>> TIEConfig.from_dict(quick.to_dict()) == quick
        True
    """

    threshold: float = 0.5
    stop_fraction: float = 0.05
    baseline: str = "uncertain"
    garbage_size: int | None = None
    garbage_noise: str = "pixel_range"
    garbage_strokes: float = 0.0
    garbage_transforms: float = 0.0
    garbage_weight: float = 0.5
    samples_per_class: int | None = None
    sample_vector: str = "one_hot"
    final_training: bool = True
    lr: float = 1e-3
    batch_size: int = 64
    generator_steps: int = 100
    generator_batch_size: int = 64
    generator_lr: float = 1e-3
    inversion_weights: Mapping[str, float] | None = field(default=None, compare=True)
    latent_dim: int = 100
    generator_width: int = 64
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.baseline not in TIE_BASELINES:
            raise ValueError(
                f"`baseline` must be one of {list(TIE_BASELINES)}, got {self.baseline!r}."
            )
        if self.garbage_noise not in GARBAGE_NOISE_KINDS:
            raise ValueError(
                f"`garbage_noise` must be one of {list(GARBAGE_NOISE_KINDS)}, got "
                f"{self.garbage_noise!r}."
            )
        if self.sample_vector not in ("one_hot", "soft"):
            raise ValueError(
                f"`sample_vector` must be 'one_hot' or 'soft', got {self.sample_vector!r}."
            )
        if not is_integer(self.seed) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}.")
        checked = {
            "seed": int(self.seed),
            "threshold": _float_in(self.threshold, "threshold", 0.0, 1.0),
            "stop_fraction": _float_in(self.stop_fraction, "stop_fraction", 0.0, 1.0),
            "garbage_strokes": _float_in(self.garbage_strokes, "garbage_strokes", 0.0, 1.0),
            "garbage_transforms": _float_in(
                self.garbage_transforms, "garbage_transforms", 0.0, 1.0
            ),
            "garbage_weight": check_number(self.garbage_weight, "garbage_weight"),
            "lr": check_number(self.lr, "lr"),
            "generator_lr": check_number(self.generator_lr, "generator_lr"),
            "batch_size": check_int(self.batch_size, "batch_size"),
            "generator_steps": check_int(self.generator_steps, "generator_steps"),
            "generator_batch_size": check_int(
                self.generator_batch_size, "generator_batch_size", minimum=2
            ),
            "latent_dim": check_int(self.latent_dim, "latent_dim"),
            "generator_width": check_int(self.generator_width, "generator_width"),
            "final_training": check_flag(self.final_training, "final_training"),
        }
        if checked["garbage_strokes"] + checked["garbage_transforms"] > 1.0:
            raise ValueError(
                "`garbage_strokes` + `garbage_transforms` must be at most 1 (shares of the "
                f"seeds), got {self.garbage_strokes!r} + {self.garbage_transforms!r}."
            )
        for name in ("garbage_size", "samples_per_class"):
            value = getattr(self, name)
            checked[name] = None if value is None else check_int(value, name)
        if not is_real(self.dropout):
            raise TypeError(f"`dropout` must be a float in [0, 1), got {self.dropout!r}.")
        if not (0 <= self.dropout < 1 and math.isfinite(self.dropout)):
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        checked["dropout"] = float(self.dropout)
        weights = self.inversion_weights
        if weights is not None:
            if not isinstance(weights, Mapping):
                raise TypeError(
                    "`inversion_weights` must be a dict of loss weights, got "
                    f"{type(weights).__name__}."
                )
            from captum_ext.inversion.network_inversion import _phase_weights

            try:  # NetworkInversion's own check (terms it knows, finite, >= 0), at build time
                _phase_weights("inversion", weights)
            except (TypeError, ValueError) as error:
                message = str(error).replace("`weights", "`inversion_weights")
                raise type(error)(message) from None
            checked["inversion_weights"] = _FrozenWeights(weights)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> TIEConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-friendly)."""
        out = dataclasses.asdict(self)
        if out["inversion_weights"] is not None:
            out["inversion_weights"] = dict(out["inversion_weights"])
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TIEConfig:
        """The config of :meth:`to_dict`'s output; unknown keys are a ``TypeError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"TIEConfig has no settings {unknown}; known: {sorted(names)}.")
        return cls(**dict(values))
