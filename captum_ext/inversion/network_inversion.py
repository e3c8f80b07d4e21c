r"""NetworkInversion: train a conditioned generator against a frozen classifier."""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from captum.log import log_usage
from torch import Tensor, nn

from captum_ext._utils.batched_grad import half_precision_dtype, in_model_precision
from captum_ext._utils.deprecation import renamed_arguments
from captum_ext._utils.distributed import (
    broadcast_buffers,
    raise_if_any_rank_failed,
    written_on_main_process,
)
from captum_ext._utils.model_state import leaves_inference_mode, preserved_state
from captum_ext._utils.precision import at_least_float32
from captum_ext._utils.seeding import (
    as_generator,
    global_rng_state,
    seeded_rng,
    set_global_rng_state,
)
from captum_ext._utils.training import (
    distributed_shard,
    load_checkpoint,
    optimiser_step,
    progress_bar,
    save_checkpoint,
    undone_on_failure,
    unwrap_distributed,
    wrap_distributed,
    writable_path_argument,
)
from captum_ext._utils.validation import (
    check_int,
    is_integer,
    is_real,
    model_device_dtype,
    model_input_dtype,
    refuse_ignored_settings,
)
from captum_ext.inversion._checkpointing import inversion_state, restore_inversion, rng_devices
from captum_ext.inversion._features import _feature_tap, count_classes
from captum_ext.inversion.conditioning import _check_labels, one_hot_vectors
from captum_ext.inversion.generator import ConditionedGenerator, check_value_range
from captum_ext.inversion.losses import (
    class_cosine_diversity,
    cosine_diversity,
    cross_entropy_to_labels,
    feature_orthogonality,
    kl_to_conditioning,
    perturbed_kl_ce,
    pixel_range,
    total_variation,
    weight_gradient_norm,
)

__all__ = ["LOSS_TERMS", "PRESETS", "NetworkInversion"]

#: Names of the loss terms, the keys of ``weights``.
LOSS_TERMS: tuple[str, ...] = (
    "kl",
    "ce",
    "cosine",
    "orthogonality",
    "perturbed",
    "total_variation",
    "pixel_range",
    "weight_gradient",
    "class_cosine",
)

_INVERSION = {"kl": 1.0, "ce": 1.0, "cosine": 0.5, "orthogonality": 0.5}
_TLDR = {
    **_INVERSION,
    "perturbed": 1.0,
    "total_variation": 1.0,
    "pixel_range": 1.0,
    "weight_gradient": 0.1,
}

#: The presets: the generator's default conditioning and the phases, each with its share of
#: the steps, the conditioning vector it feeds (None: the generator's own kind) and the loss
#: weights. All weights are our DEFAULT choices (the papers do not report theirs).
PRESETS: dict[str, dict[str, Any]] = {
    "inversion": {
        "conditioning": "vector_matrix",
        "phases": [{"share": 1.0, "vector": None, "weights": _INVERSION}],
    },
    "reconstruction": {
        "conditioning": "vector_matrix",
        "phases": [
            {"share": 0.5, "vector": None, "weights": _INVERSION},
            {"share": 0.5, "vector": "one_hot", "weights": _TLDR},
        ],
    },
    "counterfeit": {
        "conditioning": "one_hot",
        "phases": [
            {
                "share": 1.0,
                "vector": "one_hot",
                "weights": {"kl": 1.0, "cosine": 0.5, "orthogonality": 0.5},
            }
        ],
    },
}


def _stream_seed(seed: int, rank: int, stream: int) -> int:
    """A seed per (seed, rank, stream): ranks and streams draw independent numbers."""
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729 + 12_345) % (2**63)


def _float32_master(generator: nn.Module, model: nn.Module) -> bool:
    """Move a float16 / bfloat16 ``generator`` to float32 where ``model`` is a half-precision
    model (all its floating-point parameters float16, or all bfloat16): the float32 master
    copy of mixed-precision training. In float16, Adam's ``eps`` (1e-8) and its small
    squared-gradient averages ``v`` round to 0, so its steps ``m / (sqrt(v) + eps)`` are inf
    or NaN; in bfloat16 (8 significant bits) small updates are rounded away. The model still
    runs in its own dtype: the images are cast at its input (:func:`in_model_precision`).
    Returns whether the generator was moved."""
    if half_precision_dtype(model) is None:
        return False
    tensors = [*generator.parameters(), *generator.buffers()]
    if not any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        return False
    with torch.inference_mode(False):  # parameters that can still be trained
        generator.float()
    return True


def _refuse_random_source_as_network(init: Callable) -> Callable:
    """Refuse a random source (``torch.Generator`` or int) given as ``generator``, the old
    name of ``generator_net``: ``generator`` elsewhere (``sample``, Captum) is the random
    source, and the renamed network argument would reject it naming only ``generator_net``.
    Applied outside :func:`renamed_arguments`, which would rename it first."""

    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        old_value = kwargs.get("generator")
        if isinstance(old_value, torch.Generator) or is_integer(old_value):
            raise TypeError(
                "NetworkInversion(): `generator` here is the old name of `generator_net`, the "
                "generator network to train (a ConditionedGenerator), not a random source; "
                f"got {type(old_value).__name__}. Pass `seed=<int>` for the randomness."
            )
        return init(*args, **kwargs)

    return wrapper


def _phase_weights(preset: str, weights: Mapping[str, float] | None) -> list[dict[str, float]]:
    phases = [dict(phase["weights"]) for phase in PRESETS[preset]["phases"]]
    if weights is None:
        return phases
    if not isinstance(weights, Mapping):
        raise TypeError(f"`weights` must be a dict of loss weights, got {type(weights).__name__}.")
    for name, value in weights.items():
        if name not in LOSS_TERMS:
            raise ValueError(f"`weights` has an unknown term {name!r}; known: {list(LOSS_TERMS)}.")
        if not is_real(value) or not value >= 0:
            raise ValueError(f"`weights[{name!r}]` must be a finite number >= 0, got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"`weights[{name!r}]` must be finite, got {value!r}.")
        used = [phase for phase in phases if phase.get(name, 0.0) > 0]
        for phase in used or phases:
            phase[name] = float(value)
    return phases


class NetworkInversion:
    r"""Network inversion with a conditioned generator (Suhail, Sethi et al.).

    Trains one :class:`ConditionedGenerator` ``G(z, c)`` so that the frozen classifier
    ``f`` assigns its images the class of the conditioning ``c``. Each step draws ``N``
    labels uniformly, builds their conditioning (soft vector ``softmax(r)`` with the label
    as argmax, one-hot vector, hot matrix), generates ``x = G(z, c)``, evaluates
    ``q = f(x)`` and the penultimate features ``phi`` and takes an Adam step on ``G`` only
    on the weighted loss::

        L = a KL(c || softmax q) + b CE(q, argmax c) + g cos(phi) + d orth(phi)
            [+ within-class cosine of phi (``class_cosine``, off in every preset)]
            [+ TLDR priors: perturbed KL/CE, total variation, pixel range,
               squared norm of grad_w CE(f(x), argmax c)]

    (see the loss functions of :mod:`captum_ext.inversion` for each term). Presets:

    - ``"inversion"`` (arXiv 2407.18002, 2411.17777): vector-matrix conditioning; KL + CE
      + cosine + orthogonality.
    - ``"reconstruction"`` (TLDR, arXiv 2410.16884): two phases of half the steps each:
      the inversion loss, then one-hot conditioning with the TLDR priors added.
    - ``"counterfeit"`` (arXiv 2503.20187): one-hot conditioning; KL (which equals CE for
      one-hot targets) + the diversity terms; no realism priors.

    The default weights of each preset are in :data:`PRESETS` (our DEFAULT choices: the
    papers do not report theirs); ``weights`` overrides them.

    The classifier is frozen: it runs in eval mode with ``requires_grad`` off, and its
    parameters, buffers, ``requires_grad`` and ``.grad``, train/eval flags and hooks are
    exactly as before after :meth:`fit` and :meth:`sample`, also when they raise. It may
    change between calls (trained in place, or replaced through the ``model``
    attribute): each :meth:`fit` trains the generator against the classifier as it is then,
    continuing from the generator's and optimiser's current state.

    A float16 or bfloat16 model (all its floating-point parameters in that dtype) is trained
    against in mixed precision: the generator and its Adam state are kept in float32 (a
    generator built here is float32; a float16 / bfloat16 ``generator_net`` is moved to
    float32 here and at each :meth:`fit`), its images are cast to the model's dtype at the
    model's input, and the losses are computed in float32 from the model's logits and
    features. In float16, Adam's ``eps`` (1e-8) and its small squared-gradient averages
    round to 0, and its steps would turn the generator's weights into inf and NaN.

    Under ``torchrun`` (an initialised process group) the generator is wrapped in
    ``DistributedDataParallel``; every rank draws its own labels and noise from a stream
    derived from ``seed`` and its rank, ``batch_size`` is per process, and rank 0 writes the
    checkpoints (which hold every rank's random state; a failed write raises on every rank).
    A loss that becomes NaN or infinite on one rank's batch raises on every rank, before the
    backward pass. After each :meth:`fit` every rank holds rank 0's buffers (the
    generator's BatchNorm statistics), so the generators, and :meth:`sample`'s images, are
    the same on every rank.

    Args:
        model (nn.Module): The classifier ``f`` with ``K`` outputs (logits). Formerly
            ``classifier``. A model whose outputs are probabilities (it ends in a softmax, of
            which the losses would take a second one) gets a UserWarning; give it without the
            softmax, or as ``captum_ext.data.LogitsOutput(model, reads="probabilities")``.
        generator_net (ConditionedGenerator, optional): The generator network to train
            (formerly ``generator``; ``generator`` in :meth:`sample` is a
            ``torch.Generator``). Default: a new one with the preset's conditioning, ``K``
            classes and ``input_shape``, on the model's device and in its dtype (float32 for
            a float16 or bfloat16 model), initialised from ``seed``.
        preset (str, optional): ``"inversion"``, ``"reconstruction"`` or ``"counterfeit"``.
            Default: ``"inversion"``
        weights (dict, optional): Loss weights overriding the preset's, keys from
            :data:`LOSS_TERMS`. A term the preset uses is changed in the phases that use it;
            a term it does not use is added to every phase. Default: None
        preprocess (callable or tuple, optional): Maps the generator's pixels to the model's
            input space (its normalisation), for the generator built here: a callable
            taking pixels in ``value_range`` or a ``(mean, std)`` pair (see
            :class:`ConditionedGenerator`). Formerly ``normalize``. Default: None (the model
            takes pixels in ``[0, 1]``)
        value_range (tuple[float, float], optional): The pixel range ``preprocess`` takes,
            e.g. ``(0, 255)``. Default: ``(0, 1)``
        feature_layer (nn.Module or str, optional): Layer whose output gives the features
            ``phi``. Default: the input of the last ``nn.Linear`` to run (found with forward
            hooks, checked to produce the logits).
        feature_layer_input (bool, optional): Use the input of ``feature_layer`` instead of
            its output. Default: False
        input_shape (tuple[int, int, int], optional): ``(C, H, W)`` of the model's inputs,
            needed when no ``generator_net`` is given. Default: the model's ``input_shape``
            attribute when it has one.
        lr (float, optional): Adam learning rate. Default: 1e-3
        betas (tuple[float, float], optional): Adam betas. Default: ``(0.5, 0.999)``
        batch_size (int, optional): Generated images per step (per process), >= 2.
            Default: 256
        seed (int, optional): Seeds the generator's initialisation, the label/noise streams
            and dropout. Default: 0
        eps (float, optional): Perturbation size of the perturbed KL/CE term, in pixel
            units. Default: 0.1
        latent_dim (int, optional): ``z`` size of the generator built here. Default: 100
        dropout (float, optional): Stage-B dropout of the generator built here. Default: 0.1

    Examples::

        >>> import torch
        >>> from captum_ext.bundled import load_bundled_model
        >>> from captum_ext.data import normalize_digits
        >>> from captum_ext.inversion import NetworkInversion
        >>> model = load_bundled_model()
        >>> inversion = NetworkInversion(model, input_shape=(1, 28, 28),
        ...                              preprocess=normalize_digits, value_range=(0, 255),
        ...                              batch_size=16)
        >>> history = inversion.fit(3, progress=False)     # a real run: ~1000 steps
        >>> images = inversion.sample(torch.arange(10))     # one image per digit
        >>> images.shape
        torch.Size([10, 1, 28, 28])
    """

    @_refuse_random_source_as_network
    @renamed_arguments(classifier="model", generator="generator_net", normalize="preprocess")
    @leaves_inference_mode  # a generator built in inference mode could not be trained
    def __init__(
        self,
        model: nn.Module,
        generator_net: ConditionedGenerator | None = None,
        *,
        preset: str = "inversion",
        weights: Mapping[str, float] | None = None,
        preprocess: Callable[[Tensor], Tensor] | Sequence | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        feature_layer: nn.Module | str | None = None,
        feature_layer_input: bool = False,
        input_shape: Sequence[int] | None = None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        batch_size: int = 256,
        seed: int = 0,
        eps: float = 0.1,
        latent_dim: int = 100,
        dropout: float = 0.1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}.")
        if generator_net is not None and not isinstance(generator_net, ConditionedGenerator):
            raise TypeError(
                "`generator_net` must be a ConditionedGenerator (or None to build one), got "
                f"{type(generator_net).__name__}."
            )
        if not is_real(lr) or not lr > 0:
            raise ValueError(f"`lr` must be a positive float, got {lr!r}.")
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(is_real(b) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"`betas` must be two floats in [0, 1), got {betas!r}.")
        seed = check_int(seed, "seed", minimum=0)
        if not is_real(eps) or eps < 0:
            raise ValueError(f"`eps` must be a non-negative float, got {eps!r}.")
        # plain Python numbers from here on (numpy scalars pass the checks above)
        lr, betas = float(lr), (float(betas[0]), float(betas[1]))
        self.batch_size = check_int(batch_size, "batch_size", minimum=2)
        self.preset = preset
        self.seed = seed
        self.eps = float(eps)
        self._phases = _phase_weights(preset, weights)
        self._feature_layer = feature_layer
        self._feature_layer_input = bool(feature_layer_input)
        value_range = check_value_range(value_range)

        if generator_net is None:
            if input_shape is None:
                input_shape = getattr(model, "input_shape", None)
            if input_shape is None:
                raise ValueError(
                    "`input_shape` (C, H, W) is needed to build a generator for "
                    f"{type(model).__name__}; or pass a ConditionedGenerator as `generator_net`."
                )
            device, dtype = model_device_dtype(model)
            # the model setter below probes it again, and warns of a softmax output there
            num_classes = self._probe_classes(model, input_shape, device, dtype, warn=False)
            with seeded_rng(seed):
                generator_net = ConditionedGenerator(
                    num_classes,
                    tuple(input_shape),
                    latent_dim=latent_dim,
                    conditioning=PRESETS[preset]["conditioning"],
                    dropout=dropout,
                    preprocess=preprocess,
                    value_range=value_range,
                )
            if half_precision_dtype(model) is not None:
                dtype = torch.float32  # the master copy: see _float32_master
            generator_net = generator_net.to(device=device, dtype=dtype)
        else:
            refuse_ignored_settings(
                {
                    "preprocess": (preprocess, None),
                    "value_range": (value_range, (0.0, 1.0)),
                    # the generator's own size is not ignored: it is what it uses
                    "latent_dim": (
                        latent_dim,
                        latent_dim
                        if latent_dim == getattr(generator_net, "latent_dim", None)
                        else 100,
                    ),
                    "dropout": (dropout, 0.1),
                },
                "it sets the generator built here, and `generator_net` is given; give it to "
                "the ConditionedGenerator you pass",
            )
            shape = getattr(generator_net, "out_shape", None)
            if input_shape is not None and shape is not None and tuple(input_shape) != shape:
                raise ValueError(
                    f"`input_shape`={tuple(input_shape)} differs from the {shape} images of "
                    "`generator_net`."
                )
        _float32_master(generator_net, model)
        self.generator = generator_net
        self.model = model  # probes the classes and finds the feature layer
        self.optimizer = torch.optim.Adam(generator_net.parameters(), lr=float(lr), betas=betas)
        self.history: dict[str, list[float]] = {
            key: [] for key in ("step", "phase", "loss", *LOSS_TERMS)
        }
        self._step = 0
        self._rng: dict[str, Tensor] | None = None  # the sampler and global RNG states
        self._ddp: nn.Module | None = None

    # ----------------------------------------------------------------- model
    @staticmethod
    def _probe_classes(model, input_shape, device, dtype, *, warn: bool = True) -> int:
        """The number of outputs of ``model`` (:func:`count_classes`), with the probabilities
        warning for a model that ends in a softmax (whose output the cross-entropy and KL
        terms would take a second softmax of) unless ``warn`` is False."""
        return count_classes(model, input_shape, device, dtype, warn=warn)

    @staticmethod
    def _input_dtype(model: nn.Module, param: Tensor) -> torch.dtype:
        """The dtype in which ``model`` receives images made in ``param``'s dtype: the
        model's own for a half-precision model and float32 / float64 images, else
        ``param``'s (the cast of :func:`in_model_precision`)."""
        (example,) = in_model_precision(model, (param.new_empty(0),))
        return example.dtype

    def _check_model_dtype(self, model: nn.Module) -> None:
        """Refuse a model whose floating-point parameters and buffers (all of one dtype)
        differ in dtype from the generator's images as the model receives them *and* that
        fails on them: torch fails deep inside the first layer ("Input type (float) and bias
        type (double) should be the same"), and the class probe would blame
        ``input_shape``. A half-precision model receives a float32 or float64 generator's
        images cast to its dtype (:func:`in_model_precision`), so it is not refused; nor is a
        model that casts its input itself (a float64 or bfloat16 model behind
        ``x.to(dtype)``), one mixing dtypes, or one without parameters."""
        model_dtype = model_input_dtype(model)
        param = next(self.generator.parameters())
        if model_dtype is None or model_dtype == self._input_dtype(model, param):
            return
        try:
            self._probe_classes(
                model, self.generator.out_shape, param.device, param.dtype, warn=False
            )
        except (RuntimeError, ValueError) as error:
            cause = error.__cause__ or error  # the probe's ValueError wraps torch's error
            if model_dtype in (torch.float16, torch.bfloat16):
                # its generator is kept in float32, the images cast (see _float32_master)
                advice = "Move the generator to float32 first, `inversion.generator.float()`"
            else:
                advice = (
                    "Move the generator to the model's dtype first, "
                    f"`inversion.generator.to({model_dtype})`"
                )
            raise ValueError(
                f"`model` is in {model_dtype} but the generator (`generator_net`) is in "
                f"{param.dtype}, and the model fails on the generator's images "
                f"({type(cause).__name__}: {cause}). "
                f"{advice} (its optimiser state follows at the next fit), or the model back "
                f"to {param.dtype}."
            ) from error

    @property
    def model(self) -> nn.Module:
        """The frozen model; assigning a new one checks it and finds its feature layer."""
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        gen = self.generator
        param = next(gen.parameters())
        self._check_model_dtype(model)  # else the probe below fails and blames `input_shape`
        dtype = self._input_dtype(model, param)  # a half-precision model's own
        classes = self._probe_classes(model, gen.out_shape, param.device, dtype)
        if classes != gen.num_classes:
            raise ValueError(
                f"`generator_net` is conditioned on {gen.num_classes} classes but the model "
                f"has {classes} outputs."
            )
        example = torch.zeros(2, *gen.out_shape, device=param.device, dtype=dtype)
        self._tap = _feature_tap(
            model, self._feature_layer, example, layer_input=self._feature_layer_input
        )
        self._model = model

    @property
    def classifier(self) -> nn.Module:
        """Deprecated alias of :attr:`model`."""
        warnings.warn(
            "NetworkInversion.classifier is renamed model; the old name will be removed in a "
            "future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.model

    @classifier.setter
    def classifier(self, model: nn.Module) -> None:
        warnings.warn(
            "NetworkInversion.classifier is renamed model; the old name will be removed in a "
            "future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        self.model = model

    # ----------------------------------------------------------------- randomness
    def _init_rng(self, device: torch.device) -> None:
        shard = distributed_shard()
        rank = 0 if shard is None else shard[0]
        sampler = torch.Generator(device=device).manual_seed(_stream_seed(self.seed, rank, 0))
        with seeded_rng(_stream_seed(self.seed, rank, 1), self._rng_devices(device)):
            self._rng = {"sampler": sampler.get_state(), **global_rng_state(device)}

    @staticmethod
    def _rng_devices(device: torch.device) -> list[int]:
        return rng_devices(device)

    # ----------------------------------------------------------------- training
    def _phase_of(self, step: int, steps: int) -> int:
        phases = PRESETS[self.preset]["phases"]
        edge, index = 0.0, 0
        for index, phase in enumerate(phases):
            edge += phase["share"] * steps
            if step < round(edge):
                return index
        return index

    def _losses(
        self, net: nn.Module, phase: int, batch_size: int, sampler: torch.Generator
    ) -> dict[str, Tensor]:
        gen = self.generator
        weights = self._phases[phase]
        param = next(gen.parameters())
        k = gen.num_classes
        labels = torch.randint(k, (batch_size,), generator=sampler, device=param.device)
        z = torch.randn(batch_size, gen.latent_dim, generator=sampler, device=param.device)
        vector = PRESETS[self.preset]["phases"][phase]["vector"]
        vectors, matrices = gen.conditioning_for(labels, vector=vector, generator=sampler)
        target = vectors if vectors is not None else one_hot_vectors(labels, k)
        cast = [None if t is None else t.to(param.dtype) for t in (z, vectors, matrices)]
        images, pixels = net(*cast, return_pixels=True)
        # a half-precision model gets the float32 images in its dtype (gradients pass the
        # cast); the losses are formed in float32 from its logits and features
        logits = at_least_float32(self.model(*in_model_precision(self.model, (images,))))
        features = at_least_float32(self._tap.pop())
        target = target.to(logits.dtype)
        terms: dict[str, Tensor] = {}
        if weights.get("kl", 0):
            terms["kl"] = kl_to_conditioning(logits, target)
        if weights.get("ce", 0):
            terms["ce"] = cross_entropy_to_labels(logits, labels)
        if weights.get("cosine", 0):
            terms["cosine"] = cosine_diversity(features)
        if weights.get("orthogonality", 0):
            terms["orthogonality"] = feature_orthogonality(features)
        if weights.get("class_cosine", 0):
            terms["class_cosine"] = class_cosine_diversity(features, labels)
        if weights.get("total_variation", 0):
            terms["total_variation"] = total_variation(at_least_float32(pixels))
        if weights.get("pixel_range", 0):
            terms["pixel_range"] = pixel_range(at_least_float32(pixels))
        if weights.get("perturbed", 0):
            terms["perturbed"] = perturbed_kl_ce(
                self.model,
                pixels,
                target,
                eps=self.eps,
                preprocess=gen.preprocess_pixels,
                generator=sampler,
            )
            self._tap.clear()
        if weights.get("weight_gradient", 0):
            terms["weight_gradient"] = weight_gradient_norm(self.model, images, labels)
            self._tap.clear()
        return terms

    def _checkpoint_state(
        self, fit_step: int, steps: int, fit_start: int, batch_size: int
    ) -> dict[str, Any]:
        return inversion_state(self, fit_step, steps, fit_start, batch_size)

    def _restore(self, state: Mapping[str, Any], steps: int, batch_size: int) -> tuple[int, int]:
        return restore_inversion(self, state, steps, batch_size)

    @log_usage()
    def fit(
        self,
        steps: int,
        *,
        batch_size: int | None = None,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
    ) -> dict[str, list[float]]:
        r"""Train the generator for ``steps`` Adam steps against the classifier as it is now.

        Args:
            steps (int): Number of generator steps of this call (the reconstruction preset
                spends the first half in its inversion phase, the second in its TLDR phase).
            batch_size (int, optional): Generated images per step (per process), >= 2.
                Default: the constructor's ``batch_size``.
            progress (bool, optional): Show a tqdm bar (rank 0). Default: True
            checkpoint (str or PathLike, optional): File to write atomically (rank 0) every
                ``checkpoint_every`` steps and at the end: generator, optimiser, step
                counters, history and every rank's random state. Default: None
            checkpoint_every (int, optional): Default: ``max(1, steps // 10)``.
            resume (bool, optional): Continue the interrupted fit stored in ``checkpoint``
                (same ``steps``, ``batch_size``, preset, ``lr``, ``betas``, ``seed``, loss
                ``weights``, ``eps``, ``feature_layer`` and number of processes: another
                setting is refused by name, not silently
                replaced by the checkpoint's optimiser and random state); the result is
                bit-identical to an uninterrupted run on the same machine (under torchrun
                the records of the steps before the resume are rank 0's on every rank: the
                checkpoint holds rank 0's history). When the file
                does not exist yet the fit starts from the beginning. With a
                ``checkpoint``, a call that raises or is interrupted (Ctrl-C) leaves the
                object as it was before the call, so that the same object resumes exactly
                too. A ``checkpoint`` that cannot be written is refused before any step.
                Default: False

        Returns:
            dict[str, list[float]]: This fit's per-step records: ``"step"`` (global step
            number), ``"phase"``, ``"loss"`` (the weighted total) and one list per term of
            :data:`LOSS_TERMS` (NaN where a term is not used). All fits together are in
            the ``history`` attribute.
        """
        steps = check_int(steps, "steps")
        batch_size = self.batch_size if batch_size is None else batch_size
        batch_size = check_int(batch_size, "batch_size", minimum=2)
        if checkpoint_every is not None:
            checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
        if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
            raise TypeError(f"`checkpoint` must be a path, got {type(checkpoint).__name__}.")
        if resume and checkpoint is None:
            raise ValueError("`resume=True` needs the `checkpoint` file to resume from.")
        writable_path_argument(checkpoint, "checkpoint")  # before any step, not at the first save
        # the generator of a half-precision model trains in float32, also after
        # `inversion.generator.half()` or a model converted since it was built
        if _float32_master(self.generator, self.model):
            self._ddp = None  # a DistributedDataParallel wrapper holds buckets of the old dtype
        # the classifier as it is now: moved to another dtype since the generator was built
        self._check_model_dtype(self.model)
        every = checkpoint_every or max(1, steps // 10)
        # with a checkpoint, an interrupted call leaves the object as it was before it, so
        # that resume=True continues from the file (or from here), not from a partial state
        with undone_on_failure(checkpoint is not None, self._fit_snapshot, self._fit_restore):
            return self._fit_steps(steps, batch_size, progress, checkpoint, resume, every)

    def _optimizer_follows_generator(self) -> None:
        """Adam's moment estimates in the dtype and on the device of their parameters: after
        ``inversion.generator.to(torch.float64)`` (or to another device) following a fit,
        they are still float32 (or elsewhere), and torch's Adam step fails on the mix.
        Casting them keeps their values (what ``Optimizer.load_state_dict`` does)."""
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if (
                    key != "step"
                    and isinstance(value, Tensor)
                    and value.is_floating_point()
                    and (value.dtype != param.dtype or value.device != param.device)
                ):
                    state[key] = value.to(dtype=param.dtype, device=param.device)

    def _fit_snapshot(self) -> dict[str, Any]:
        """What a fit changes, copied (tensors to the CPU)."""
        return {
            "generator": {
                k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()
            },
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self._step,
            "history": copy.deepcopy(self.history),
            "rng": copy.deepcopy(self._rng),
        }

    def _fit_restore(self, snapshot: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.generator.load_state_dict(snapshot["generator"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self._step = snapshot["step"]
        self.history = snapshot["history"]
        self._rng = snapshot["rng"]

    def _fit_steps(self, steps, batch_size, progress, checkpoint, resume, every):
        gen = self.generator
        param = next(gen.parameters())
        device = param.device

        start, fit_start = 0, len(self.history["step"])
        if resume and os.path.isfile(os.fspath(checkpoint)):
            state = load_checkpoint(checkpoint, map_location=device)
            start, fit_start = self._restore(state, steps, batch_size)
        if self._rng is None:
            self._init_rng(device)
        self._optimizer_follows_generator()

        gen_params = [p for p in gen.parameters() if p.requires_grad]
        was_training = gen.training
        bar = progress_bar(steps, bool(progress), desc="inversion", unit="step", initial=start)
        if distributed_shard() is None:
            net = gen
        else:  # one DDP wrapper for all fits: a new one per fit would add gradient hooks
            if self._ddp is None or unwrap_distributed(self._ddp) is not gen:
                self._ddp = wrap_distributed(gen)
            net = self._ddp
        try:
            with (
                preserved_state([self.model]),
                torch.inference_mode(False),  # training also inside an inference-mode block
                torch.random.fork_rng(devices=self._rng_devices(device)),
                self._tap.active(),
            ):
                self.model.eval()
                for p in self.model.parameters():
                    p.requires_grad_(False)
                torch.set_grad_enabled(True)
                sampler = torch.Generator(device=device)
                sampler.set_state(self._rng["sampler"].cpu())
                set_global_rng_state(self._rng, device)
                gen.train()
                for i in range(start, steps):
                    phase = self._phase_of(i, steps)
                    terms = self._losses(net, phase, batch_size, sampler)
                    weights = self._phases[phase]
                    loss = sum(weights[name] * value for name, value in terms.items())
                    value = float(loss.detach())
                    diverged = None
                    if not math.isfinite(value):
                        diverged = FloatingPointError(
                            f"NetworkInversion.fit: the loss became {value} at step "
                            f"{self._step + 1} ({', '.join(terms)}); try a smaller `lr`."
                        )
                    # under torchrun one rank's batch can diverge alone: every rank raises,
                    # before the backward pass whose all-reduce the others would wait in
                    raise_if_any_rank_failed(diverged, what="NetworkInversion.fit")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward(inputs=gen_params)
                    optimiser_step(self.optimizer)
                    self._step += 1
                    self._record(phase, loss, terms)
                    self._rng = {"sampler": sampler.get_state(), **global_rng_state(device)}
                    if bar:
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.history['loss'][-1]:.4f}", refresh=False)
                    if checkpoint is not None and ((i + 1) % every == 0 or i + 1 == steps):
                        state = self._checkpoint_state(i + 1, steps, fit_start, batch_size)
                        # rank 0 writes; every rank returns once it has (a failed write
                        # raises on every rank, not on rank 0 alone)
                        written_on_main_process(
                            lambda state=state: save_checkpoint(state, checkpoint),
                            what="NetworkInversion.fit writing the checkpoint",
                        )
        finally:
            gen.train(was_training)
            if bar:
                bar.close()
        # DDP gives every rank rank 0's buffers at the start of each forward pass only: after
        # the last step each rank holds the BatchNorm statistics its own batch updated, and
        # sample() would give other images on every rank
        broadcast_buffers(gen)
        return {key: values[fit_start:] for key, values in self.history.items()}

    def _record(self, phase: int, loss: Tensor, terms: Mapping[str, Tensor]) -> None:
        self.history["step"].append(self._step)
        self.history["phase"].append(phase)
        self.history["loss"].append(float(loss.detach()))
        for name in LOSS_TERMS:
            value = terms.get(name)
            self.history[name].append(float("nan") if value is None else float(value.detach()))

    # ----------------------------------------------------------------- sampling
    def _sampling_generator(self, generator, device) -> torch.Generator:
        if generator is None:
            return torch.Generator(device=device).manual_seed(_stream_seed(self.seed, 0, 2))
        return as_generator(generator, device=device)

    def sample(
        self,
        labels: Tensor | Sequence[int],
        *,
        generator: torch.Generator | int | None = None,
        vector: str | None = None,
        batch_size: int | None = None,
        return_pixels: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        r"""One generated image per requested label, in the classifier's input space.

        The generator runs in eval mode (no dropout, BatchNorm running statistics) without
        gradients, in batches of ``batch_size``; its train/eval flag is restored.

        Args:
            labels (Tensor or list[int]): ``N`` class indices.
            generator (torch.Generator or int, optional): Source of ``z`` and of the soft
                vectors (a ``torch.Generator`` on the generator's device, or an int seed).
                Default: None, a fixed seed derived from ``seed`` (same images every call).
            vector (str, optional): ``"soft"`` or ``"one_hot"`` conditioning vectors.
                Default: the preset's last phase (one-hot for reconstruction and
                counterfeits, the generator's own kind otherwise).
            batch_size (int, optional): Default: the constructor's ``batch_size``.
            return_pixels (bool, optional): Also return the pixels in ``[0, 1]``.

        Returns:
            Tensor: ``N x C x H x W`` (and the pixels with ``return_pixels``), on the
            generator's device, in the dtype the model takes: its own for a float16 or
            bfloat16 model (the float32 generator's images cast as in training), else the
            generator's.
        """
        gen = self.generator
        param = next(gen.parameters())
        labels = _check_labels(labels, gen.num_classes, param.device).to(param.device)
        batch_size = check_int(batch_size or self.batch_size, "batch_size")
        if vector is None:
            vector = PRESETS[self.preset]["phases"][-1]["vector"]
        source = self._sampling_generator(generator, param.device)
        was_training = gen.training
        images, pixels = [], []
        # all draws first (z, then the soft vectors, as ConditionedGenerator.generate), so
        # that the images do not depend on `batch_size`; hot matrices per chunk
        z = torch.randn(labels.shape[0], gen.latent_dim, generator=source, device=param.device)
        vectors, _ = gen.conditioning_for(labels, vector=vector, generator=source)
        try:
            gen.eval()
            with torch.no_grad():
                for rows in torch.arange(labels.shape[0], device=param.device).split(batch_size):
                    chunk_vectors = None if vectors is None else vectors[rows].to(param.dtype)
                    matrices = (
                        gen.hot_matrices(labels[rows], dtype=param.dtype)
                        if gen.uses_matrix
                        else None
                    )
                    x, p = gen(z[rows].to(param.dtype), chunk_vectors, matrices, return_pixels=True)
                    images.append(x)
                    pixels.append(p)
        finally:
            gen.train(was_training)
        if not images:
            empty = torch.empty(0, *gen.out_shape, device=param.device, dtype=param.dtype)
            images, pixels = [empty], [empty]
        # as the model takes them: a half-precision model's dtype (see _float32_master)
        out, out_pixels = in_model_precision(self.model, (torch.cat(images), torch.cat(pixels)))
        return (out, out_pixels) if return_pixels else out

    def sample_classes(
        self,
        per_class: int,
        *,
        generator: torch.Generator | int | None = None,
        vector: str | None = None,
        batch_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``per_class`` images of every class, in one batched pass.

        Args:
            per_class (int): Images per class.
            generator, vector, batch_size: As in :meth:`sample`.

        Returns:
            tuple[Tensor, Tensor]: images ``(K per_class) x C x H x W`` (in the dtype of
            :meth:`sample`) and their labels ``0, ..., 0, 1, ..., K - 1`` (int64).
        """
        per_class = check_int(per_class, "per_class")
        param = next(self.generator.parameters())
        labels = torch.arange(self.generator.num_classes, device=param.device)
        labels = labels.repeat_interleave(per_class)
        images = self.sample(labels, generator=generator, vector=vector, batch_size=batch_size)
        return images, labels
