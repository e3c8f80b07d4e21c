r"""IntrospectiveNetwork: a reflective second stage on the introspective features."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from captum_ext._utils.batched_grad import _tensors_put_back, in_model_precision
from captum_ext._utils.batches import dict_batch
from captum_ext._utils.distributed import (
    checked_on_every_rank,
    tensor_fingerprint,
    written_on_main_process,
)
from captum_ext._utils.hooks import call_hook, registered_hooks
from captum_ext._utils.layers import root_module
from captum_ext._utils.model_state import (
    gradients_on,
    leaves_inference_mode,
    module_state,
    preserved_state,
    restore_module_state,
)
from captum_ext._utils.optional import import_optional
from captum_ext._utils.precision import at_least_float32, precise
from captum_ext._utils.seeding import global_rng_state, seeded_rng, set_global_rng_state
from captum_ext._utils.training import (
    atomic_path,
    barrier,
    distributed_shard,
    load_checkpoint,
    load_fitting_state,
    optimiser_step,
    progress_bar,
    save_checkpoint,
    undone_on_failure,
    unwrap_distributed,
    wrap_distributed,
    writable_path_argument,
)
from captum_ext._utils.validation import (
    check_flag,
    check_int,
    check_number,
    format_inputs,
    model_device,
)
from captum_ext.metrics._trust_common import _head_features, _resolve_head, _weight_of

from .features import (
    _cotangents,
    _features_and_classes,
    _normalised_factors,
    _unit,
    check_feature_options,
)

#: the keys of a saved network (see :meth:`IntrospectiveNetwork.save`)
_SAVED_KEYS = ("config", "head")
_CHECKPOINT_NAME = "introspection.pt"


def _label_tensor(labels: Any) -> Tensor:
    """``labels`` (a tensor, a numpy array or a list of ints) as a tensor of integer class
    indices; float, complex or boolean labels are refused, naming ``labels`` (a cast would
    truncate 3.7 to class 3 without a word)."""
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"`labels` must hold integer class indices: {error}") from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"`labels` must hold integer class indices, got {tensor.dtype}.")
    return tensor


def make_head(in_features: int, num_classes: int, hidden_width: int = 256) -> nn.Sequential:
    """Stage 2: an MLP with three linear layers (ReLU between them), as in the paper."""
    in_features = check_int(in_features, "in_features")
    num_classes = check_int(num_classes, "num_classes")
    hidden_width = check_int(hidden_width, "hidden_width")
    return nn.Sequential(
        nn.Linear(in_features, hidden_width),
        nn.ReLU(),
        nn.Linear(hidden_width, hidden_width),
        nn.ReLU(),
        nn.Linear(hidden_width, num_classes),
    )


#: the feature settings of a checkpoint written before they were recorded: the
#: constructor's defaults
_FEATURE_DEFAULTS: dict[str, Any] = {
    "form": "per_class",
    "k": None,
    "normalize": "per_class",
    "layer": None,
}


def _feature_settings(network: IntrospectiveNetwork) -> dict[str, Any]:
    """The settings that make the features (and so the objective) of ``network``'s fit, as
    plain values a ``weights_only`` checkpoint holds: ``layer`` as its dotted name in the
    model (None: the final linear layer found automatically; it is compared as given, so
    None and that layer's name count as different). ``output_transform`` is a function and
    is not compared."""
    layer = network.layer
    if layer is not None and not isinstance(layer, str):
        names = {
            id(module): name for name, module in unwrap_distributed(network.model).named_modules()
        }
        # a module outside the model is known by its class only
        layer = names.get(id(layer), f"<{type(layer).__qualname__}>")
    return {
        "form": network.form,
        "k": None if network.k is None else int(network.k),
        "normalize": network.normalize,
        "layer": layer,
    }


def _check_resumed_settings(
    state: Mapping[str, Any],
    path: Path,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    features: Mapping[str, Any],
) -> None:
    """Refuse a resumed fit whose settings differ from the checkpoint's: the optimiser's
    saved state would set the old ``lr`` and ``weight_decay`` back, the saved generator the
    old seed's order, a checkpoint past ``epochs`` would be returned as it is, and other
    ``features`` (form, k, normalize, layer) would train the head on another objective.
    A checkpoint written before the feature settings were recorded is not compared for them
    (they cannot be told); a single setting it lacks is compared with its default."""
    where = f"the checkpoint in `checkpoint_dir` ({str(path)!r})"
    differ = []
    if state.get("features") is not None:
        saved_features = {**_FEATURE_DEFAULTS, **state["features"]}
        differ = [
            f"`{name}`={value!r} (the checkpoint's: {saved_features[name]!r})"
            for name, value in features.items()
            if saved_features[name] != value
        ]
    if differ:
        raise ValueError(
            f"`resume`: the feature settings {', '.join(differ)} differ from those {where} "
            "was written with; build the IntrospectiveNetwork with the same settings to "
            "resume, or start a new fit without `resume`."
        )
    group = state["optimiser"]["param_groups"][0]
    saved = {
        "lr": (lr, float(group["lr"]), "learning rate"),
        "weight_decay": (weight_decay, float(group["weight_decay"]), "weight decay"),
    }
    if "seed" in state:  # checkpoints written before the seed was saved: not checked
        saved["seed"] = (seed, int(state["seed"]), "seed")
    if "batch_size" in state:
        saved["batch_size"] = (batch_size, int(state["batch_size"]), "batch size")
    for name, (given, written, what) in saved.items():
        if given != written:
            raise ValueError(
                f"`{name}`={given}, but {where} was written with {written}; resume with the "
                f"same {what}, or start a new fit without `resume`."
            )
    done = int(state["epoch"])
    if epochs < done:
        raise ValueError(
            f"`epochs`={epochs}, but {where} already holds {done} epoch"
            f"{'' if done == 1 else 's'}; resume with "
            f"`epochs` >= {done}, or start a new fit without `resume`."
        )


class IntrospectiveNetwork(nn.Module):
    r"""Introspective learning: stage 1 senses, stage 2 reflects on "Why P, rather than Q?".

    Stage 1 is the trained ``model`` (frozen: it is never trained here and comes back exactly
    as found). Stage 2 is a three-layer MLP ``head`` trained with cross-entropy on the
    :func:`~captum_ext.introspection.introspective_features` of the training set; its
    prediction is the introspective prediction:

    .. code-block:: text

        r_x        = [ d CE(f(x), Q) / d W ]_Q       (closed form (p - e_Q) h^T on the last layer)
        prediction = argmax H(r_x),   probabilities = softmax(H(r_x))

    Paper: M. Prabhushankar and G. AlRegib, "Introspective Learning: A Two-Stage Approach for
    Inference in Neural Networks", NeurIPS 2022.

    The network is a differentiable function of its inputs: Captum's gradient methods
    (``Saliency(network)``, ``IntegratedGradients(network)``, ``NoiseTunnel``) explain the
    introspective prediction. Where an input requires gradients, ``forward`` computes
    the features twice: their values (as without gradients, so the outputs are the same)
    and their graph (the closed form with ``p`` and ``h`` differentiated; at another
    ``layer``, per example, the weight gradients with ``create_graph``, a second-order
    derivative of stage 1). Stage 1's parameters stay out of the graph: a ``backward``
    leaves their ``.grad`` as it was, and its buffers (batch norm running statistics) are
    never changed. A stage 1 in train mode is differentiated as the features are computed:
    at the final linear layer one pass over the batch (a batch norm normalises with the
    batch's statistics, so an example's gradient also flows through the others), at another
    ``layer`` each example alone. With dropout active in stage 1, the second pass draws the
    random masks of the first at the final linear layer (the gradient is that of the
    value); at another ``layer`` the two passes draw different masks, so the value and the
    gradient come from different dropout masks: call ``model.eval()`` to explain the
    model as it predicts. :meth:`features`, :meth:`predict` and :meth:`predict_proba` take
    no gradient.

    A stage 1 with several inputs is called as Captum calls it, ``network(x, y)`` (or
    ``network((x, y))``): ``Saliency(network).attribute((x, y), target=...)`` explains
    both.

    Args:
        model (nn.Module): the trained classifier, returning (N, C) logits.
        head (nn.Module, optional): stage 2, mapping (N, F) features to (N, C) logits.
            Default: None, :func:`make_head` built by :meth:`fit` from the feature size.
        layer, form, k, normalize, output_transform: as in
            :func:`~captum_ext.introspection.introspective_features`.
        hidden_width (int, optional): width of the default head. Default: 256.

    Examples::

        >>> from captum_ext.introspection import IntrospectiveNetwork
        >>> network = IntrospectiveNetwork(model, hidden_width=32)
        >>> network = network.fit(images, labels, epochs=2, progress=False)
        >>> network.predict_proba(images[:3]).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module | None = None,
        *,
        layer: Any = None,
        form: str = "per_class",
        k: int | None = None,
        normalize: str | None = "per_class",
        hidden_width: int = 256,
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
        if head is not None and not isinstance(head, nn.Module):
            raise TypeError(f"`head` must be an nn.Module or None, got {type(head).__name__}.")
        # stage 1 is held outside the module tree: it is frozen, and neither saved with the
        # head nor moved by .to() on the network
        self.__dict__["model"] = model
        self.head = head
        self.form, self.k, self.normalize = check_feature_options(form, k, normalize)
        self.layer = layer
        self.hidden_width = check_int(hidden_width, "hidden_width")
        self.output_transform = output_transform

    # ------------------------------------------------------------------ stage 1
    def features(self, inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
        """The introspective features of ``inputs``, ``(N, F)`` (no gradient)."""
        return self._features_and_classes(inputs)[0]

    def _features_and_classes(self, inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, int]:
        """:meth:`features` and the number of classes of the logits they came from."""
        features, classes = _features_and_classes(
            self.model,
            inputs,
            layer=self.layer,
            form=self.form,
            k=self.k,
            normalize=self.normalize,
            output_transform=self.output_transform,
        )
        return features.detach(), classes

    def _differentiable_features(self, inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
        """:meth:`features`, differentiable in ``inputs``: their values exactly (computed by
        :func:`~captum_ext.introspection.introspective_features`, which takes no gradient),
        with the gradient of a second pass that follows the same formula under autograd
        (``values + (again - again.detach())``). That pass differentiates ``p`` and ``h`` of
        the closed form ``(p - e_Q) h^T`` (one more forward pass of stage 1), or, at another
        ``layer``, the per-example weight gradients with the graph kept (a second-order
        derivative of stage 1). Stage 1's parameters take no part in the graph (it is frozen:
        a ``backward`` leaves their ``.grad`` as it was)."""
        inputs = format_inputs(inputs)
        device = model_device(self.model) or inputs[0].device
        drawn = global_rng_state(device)
        values = self.features(inputs)
        # the same random draws again (dropout in train mode): at the final linear layer
        # the graph pass runs the forward passes of the feature function in its order,
        # so its dropout masks are those of the values
        set_global_rng_state(drawn, device)
        again = _feature_graph(self, inputs)
        return values + (again - again.detach()).to(values.dtype)

    # ------------------------------------------------------------------ stage 2
    def forward(self, *args: Tensor | tuple[Tensor, ...], **kwargs: Any) -> Tensor:
        """Stage 2's logits, ``(N, C)``.

        ``inputs``: stage 1's inputs, as Captum passes them: ``network(x)``, or for a
        stage 1 with several inputs ``network(x, y)`` (Captum's ``forward(*inputs)``) or
        ``network((x, y))``; also by name, ``network(inputs=x)``.

        Differentiable in ``inputs`` (the introspective features and the head), so Captum's
        gradient methods (Saliency, IntegratedGradients, NoiseTunnel, ...) explain the
        introspective prediction. Where an input requires gradients the features are
        computed twice (their values, then their graph), else once; stage 1 stays frozen.
        """
        inputs = _packed_inputs(_named_inputs(args, kwargs))
        head = self._fitted_head()
        if _wants_input_gradient(inputs):
            features = self._differentiable_features(inputs)
        else:
            features = self.features(inputs)
        first = next(head.parameters(), None)
        if first is not None:
            features = features.to(device=first.device, dtype=first.dtype)
        takes = getattr(head[0], "in_features", None) if isinstance(head, nn.Sequential) else None
        if takes is not None and features.shape[1] != takes:
            raise ValueError(
                f"the introspective head takes {takes} features, but this model (at layer "
                f"{self.layer or 'its final linear layer'}, form {self.form!r}) gives "
                f"{features.shape[1]}: the head was fitted or saved for another model, "
                "layer or form."
            )
        return head(features)

    def predict_proba(self, inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
        """The introspective probabilities, ``(N, C)``."""
        head = self._fitted_head()
        with preserved_state([head]):
            head.eval()
            with torch.no_grad():
                return torch.softmax(at_least_float32(self(inputs)), dim=1)

    def predict(self, inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
        """The introspective predictions, ``(N,)`` class indices."""
        return self.predict_proba(inputs).argmax(dim=1)

    def _fitted_head(self) -> nn.Module:
        if self.head is None:
            raise RuntimeError(
                "the introspective head is not fitted: call fit(...) first, or load(...)."
            )
        return self.head

    # ------------------------------------------------------------------ training
    @leaves_inference_mode
    def fit(
        self,
        inputs_or_loader: Any,
        labels: Tensor | None = None,
        *,
        epochs: int = 10,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        seed: int = 0,
    ) -> IntrospectiveNetwork:
        r"""Train stage 2 on the introspective features of the training set.

        The features of every example are computed once (stage 1 is frozen, so they do not
        change), then the head is trained with Adam and cross-entropy on shuffled
        mini-batches drawn from a generator seeded with ``seed``. Every other random draw of
        the call (the default head's initialisation, dropout or other random layers of a
        given head) comes from torch's global random generator (CPU, and the head's CUDA
        device) seeded with ``seed`` inside the call: the same ``seed`` gives the same head
        whatever the caller's random state, and the caller's random state is left as it was.

        With ``checkpoint_dir`` the head, the optimiser, the shuffling generator and the
        global random state of the call are saved atomically (with a checksum) after each
        epoch, with the seed, batch size and epoch count; ``resume=True`` continues from
        there and ends bit-identical to an uninterrupted fit. The resumed call must be given
        the settings of the checkpoint's fit: another ``lr``, ``weight_decay``, ``seed`` or
        ``batch_size``, or fewer ``epochs`` than the checkpoint already holds, is refused
        with a ``ValueError`` (a checkpoint written before the seed and the batch size were
        saved is not checked for those two), and so is a checkpoint of a head of another
        architecture (another ``hidden_width``, say), before anything is loaded. The
        feature settings ``form``, ``k``, ``normalize`` and ``layer`` (as given: None and
        the name of the layer it finds are different settings) are saved too and must
        match as well (a checkpoint written before they were saved is compared with the
        defaults); ``output_transform``, a function, is not compared. A
        checkpoint written before the global random state was saved still resumes; the
        global generator then restarts from ``seed`` at the resumed epoch, which changes
        nothing for a head without random layers (the default one) but gives a head with
        dropout other draws than an uninterrupted fit.

        **A later call continues.** A call that does not resume a checkpoint trains the
        current head for ``epochs`` more epochs: a head fitted by an earlier call (or given
        to the constructor) is not re-initialised, so ``seed`` then seeds only the shuffling
        and the head's random layers, not its initial parameters; each call uses a new Adam
        optimiser (its moment estimates start from zero) and restarts the shuffling
        generator and the global random generator from ``seed``. Two calls of 2 epochs
        therefore give neither one call of 4 epochs nor a fresh fit with the second call's
        ``seed``; the second call equals the fit of a new network given a copy of the first
        call's fitted head as ``head``. To start afresh, set ``network.head = None`` first
        (the default head is then built again from ``seed``). With ``checkpoint_dir`` and
        ``resume=False`` the call counts its epochs from 0 and overwrites the checkpoint;
        with ``resume=True`` a checkpoint's head replaces the current head's values.

        Under ``torchrun`` (an initialised torch.distributed process group) every process
        computes the features of the training set, takes its share of each epoch's shuffled
        order (the same generator on every rank; ``batch_size`` is per process, so one step
        sees ``world_size x batch_size`` examples) and the head is trained in
        ``DistributedDataParallel``; rank 0 writes the checkpoints. So that every process
        takes the same number of steps, each epoch leaves out the ``N mod world_size``
        examples that its shuffled order puts last (other ones each epoch; none on one
        process). Every process must therefore pass the same, whole training set (not its
        own share): the number of examples and the labels in order (with a tensor of
        inputs, its first and last rows as well) are compared before training, and
        processes given different ones are refused with a ``ValueError`` on every process.
        A check that fails on one process only (a label outside the model's classes in its
        data) raises on every process too: that process its own error, the others a
        ``ValueError`` naming its rank and message.

        Args:
            inputs_or_loader: a tensor of inputs (with ``labels``), or an iterable of
                ``(inputs, labels)`` batches such as a ``DataLoader``.
            labels (Tensor, optional): ``(N,)`` integer class indices in ``[0, C)`` (a tensor,
                a numpy integer array or a list of ints), with a tensor of inputs; float
                labels are refused with a ``TypeError``, not rounded. A given ``head`` must
                map the introspective features to ``C`` logits (``ValueError`` otherwise).
            epochs (int): passes over the features (in all, counting those a resumed
                checkpoint holds). Default: 10.
            batch_size (int): examples per step. Default: 128.
            lr (float): Adam's learning rate. Default: 1e-3.
            weight_decay (float): Adam's weight decay. Default: 0.
            checkpoint_dir (str or Path, optional): folder of ``introspection.pt``.
            resume (bool): continue from the checkpoint in ``checkpoint_dir`` (which it
                needs) if there is one, with the same ``lr``, ``weight_decay``, ``seed`` and
                ``batch_size`` as the fit that wrote it.
                A call that raises or is interrupted leaves the head as it was before the
                call (parameter and buffer values, dtype and device, train/eval mode of every
                submodule, ``requires_grad`` and ``.grad``; no head if the call was to build
                it; so the same object resumes exactly from the checkpoint), and a folder
                that cannot be written is refused before training.
            progress (bool): a progress bar over the epochs on stderr. Default: True.
            seed (int): seed of the default head's initialisation (when the call builds it),
                of the shuffling and of the head's random layers. Default: 0.

        Returns:
            IntrospectiveNetwork: ``self``, fitted.
        """
        shard = distributed_shard()
        # under torch.distributed every check before the first collective ends in one
        # gathering step: a check that fails on one process only (a label outside the
        # classes in its data) raises on every process instead of leaving the others in
        # DDP's all-reduce, and processes given different training sets are refused
        with checked_on_every_rank("IntrospectiveNetwork.fit") as agreement:
            epochs = check_int(epochs, "epochs")
            batch_size = check_int(batch_size, "batch_size")
            lr = check_number(lr, "lr")
            weight_decay = check_number(weight_decay, "weight_decay", minimum=0, allow_minimum=True)
            seed = check_int(seed, "seed", minimum=0)
            resume = check_flag(resume, "resume")
            progress = check_flag(progress, "progress")
            if resume and checkpoint_dir is None:
                raise ValueError("`resume=True` needs the `checkpoint_dir` to resume from.")
            writable_path_argument(checkpoint_dir, "checkpoint_dir", folder=True)
            # a DataLoader draws its base seed (and a shuffling sampler its order) from torch's
            # global generator: from ``seed`` here, and the caller's stream is left alone
            # (the number of classes comes from the logits of the features' own forward
            # passes: a further pass of one example would fail on a train-mode BatchNorm1d
            # and draw train-mode dropout from the caller's generator)
            with seeded_rng(seed, []):
                features, targets, num_classes = self._training_set(inputs_or_loader, labels)
            if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
                raise ValueError(
                    f"`labels` must be class indices in [0, {num_classes - 1}], got values in "
                    f"[{int(targets.min())}, {int(targets.max())}]."
                )
            if self.head is not None:
                self._check_head(features, num_classes)
            if shard is not None:  # the labels, in order (and a tensor's first and last rows)
                given = inputs_or_loader if isinstance(inputs_or_loader, Tensor) else None
                rows = () if given is None else (given[:1], given[-1:])
                agreement.same_data(
                    "`inputs_or_loader`",
                    len(features),
                    tensor_fingerprint(*rows, targets),
                    whole="the same, whole training set",
                )
        world = 1 if shard is None else shard[1]
        if len(features) < world:  # the same on every process (their counts agree)
            raise ValueError(
                f"`inputs_or_loader` has {len(features)} examples for {world} processes."
            )
        # the seed drives the head's initialisation and random layers without resetting the
        # caller's RNG (CPU, and the CUDA device the head trains on)
        device = self._training_device(features)
        devices = [device] if device.type == "cuda" else []
        # an interrupted call leaves the head as it was (and an unfitted network unfitted), so
        # that resume=True continues from the file (or from the start), not from a partly
        # trained head, and a head given in eval mode does not come back training
        with (
            undone_on_failure(True, self._head_copy, self._put_head_back),
            seeded_rng(seed, devices),
        ):
            return self._train_head(
                features, targets, num_classes, epochs, batch_size, lr, weight_decay,
                checkpoint_dir, resume, progress, seed,
            )  # fmt: skip

    def _check_head(self, features: Tensor, num_classes: int) -> None:
        """Refuse a given head that does not map the introspective features (N, F) to the
        model's (N, C) logits, naming ``head`` with both sizes (torch fails deep inside the
        training otherwise, or a head with fewer outputs fits and predicts too few classes).
        The head is run once on one example, in eval mode and without gradients; its state
        is left as it was."""
        head = self.head
        assert head is not None
        size = features.shape[1]
        where = f"(at layer {self.layer or 'its final linear layer'}, form {self.form!r})"
        takes = getattr(head[0], "in_features", None) if isinstance(head, nn.Sequential) else None
        if isinstance(takes, int) and takes > 0 and takes != size:
            raise ValueError(
                f"`head` takes {takes} input features, but the introspective features of this "
                f"model {where} have {size}; give a head that takes {size} features "
                f"(e.g. make_head({size}, {num_classes})), or head=None to build one."
            )
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in head.parameters()):
            return  # a lazy head takes its sizes from its first batch
        first = next(head.parameters(), None)
        sample = features[:1]
        if first is not None:
            sample = sample.to(device=first.device, dtype=first.dtype)
        try:
            with preserved_state([head]), torch.no_grad():
                head.eval()
                output = head(sample)
        except RuntimeError as error:
            raise ValueError(
                f"`head` cannot take the introspective features of this model {where}, "
                f"{size} per example: {error}"
            ) from None
        outputs = output.shape[1] if isinstance(output, Tensor) and output.dim() == 2 else None
        if outputs != num_classes:
            got = (
                f"{outputs} outputs"
                if outputs is not None
                else f"an output of shape {tuple(getattr(output, 'shape', ()))}"
            )
            raise ValueError(
                f"`head` gives {got} per example, but the model has {num_classes} classes; "
                f"give a head with {num_classes} outputs (e.g. make_head({size}, "
                f"{num_classes})), or head=None to build one."
            )

    def _training_device(self, features: Tensor) -> torch.device:
        """Where the head trains: a given head's device, else the features'."""
        first = None if self.head is None else next(self.head.parameters(), None)
        return features.device if first is None else first.device

    def _head_copy(self) -> tuple:
        head = self.head
        return head, None if head is None else module_state(head)

    def _put_head_back(self, snapshot: tuple) -> None:
        head, saved = snapshot
        if head is not None:
            restore_module_state(saved)
        self.head = head

    def _train_head(
        self,
        features: Tensor,
        targets: Tensor,
        num_classes: int,
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        checkpoint_dir: str | Path | None,
        resume: bool,
        progress: bool,
        seed: int,
    ) -> IntrospectiveNetwork:
        path = Path(checkpoint_dir) / _CHECKPOINT_NAME if checkpoint_dir is not None else None
        shard = distributed_shard()
        rank, world = shard if shard is not None else (0, 1)
        state = None
        if resume and path is not None and path.is_file():
            state = load_checkpoint(
                path, argument="checkpoint_dir", keys=("head", "optimiser", "generator", "epoch")
            )
            if int(state.get("world_size", 1)) != world:  # each rank trains on order[rank::world]
                raise ValueError(
                    f"`checkpoint_dir`: the checkpoint was written by {state.get('world_size', 1)} "
                    f"processes; resume it with the same number, not {world}."
                )
            _check_resumed_settings(
                state, path, epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, seed=seed, features=_feature_settings(self),
            )  # fmt: skip
        if self.head is None:
            # float32 at least, float64 for a float64 model's features
            dtype = torch.promote_types(features.dtype, torch.float32)
            self.head = make_head(features.shape[1], num_classes, self.hidden_width)
            self.head.to(device=features.device, dtype=dtype)
        head = self.head
        first_parameter = next(head.parameters(), None)
        if first_parameter is not None:  # a given head: the features in its dtype
            features = features.to(device=first_parameter.device, dtype=first_parameter.dtype)
            targets = targets.to(first_parameter.device)
        device = features.device
        optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        start = 0
        if state is not None:
            # every key and shape checked before anything is copied into the head
            load_fitting_state(
                head, state["head"], f"`checkpoint_dir`: the checkpoint {str(path)!r}"
            )
            optimiser.load_state_dict(state["optimiser"])
            generator.set_state(state["generator"])
            if "rng" in state:  # older checkpoints: the global RNG as seeded by the call
                set_global_rng_state(state["rng"], device)
            start = int(state["epoch"])
        head.train()
        trained = wrap_distributed(head)
        bar = progress_bar(epochs, progress, desc="introspective head", unit="epoch", initial=start)
        try:
            for epoch in range(start, epochs):
                order = torch.randperm(len(features), generator=generator)
                # every rank the same number of steps (DDP all-reduces each one)
                order = order[: len(order) // world * world][rank::world]
                for first in range(0, len(order), batch_size):
                    batch = order[first : first + batch_size].to(features.device)
                    with gradients_on():  # also when called inside torch.no_grad()
                        loss = F.cross_entropy(trained(features[batch]), targets[batch])
                        optimiser.zero_grad()
                        loss.backward()
                    optimiser_step(optimiser)
                if path is None:
                    barrier()
                else:  # rank 0 writes; a failed write raises on every process
                    state = {
                        "head": unwrap_distributed(trained).state_dict(),
                        "optimiser": optimiser.state_dict(),
                        "generator": generator.get_state(),
                        "rng": global_rng_state(device),
                        "epoch": epoch + 1,
                        "seed": seed,
                        "batch_size": batch_size,
                        "world_size": world,
                        "features": _feature_settings(self),
                    }
                    written_on_main_process(
                        functools.partial(save_checkpoint, state, path),
                        what="writing the checkpoint",
                    )
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()
        head.eval()
        return self

    def _training_set(
        self, inputs_or_loader: Any, labels: Tensor | None
    ) -> tuple[Tensor, Tensor, int]:
        """The features and labels of every example, and the model's number of classes (from
        the first batch's logits; the loader is read once: a generator of batches cannot be
        read twice)."""
        if isinstance(inputs_or_loader, Tensor):
            if inputs_or_loader.dim() == 0:
                raise ValueError(
                    "`inputs_or_loader` is a scalar; expected a batch of inputs, examples first."
                )
            if labels is None:
                raise ValueError("`labels` is required when `inputs_or_loader` is a tensor.")
            labels = _label_tensor(labels)
            if labels.dim() != 1 or labels.shape[0] != inputs_or_loader.shape[0]:
                raise ValueError(
                    f"`labels` must have shape ({inputs_or_loader.shape[0]},) to match the "
                    f"inputs, got {tuple(labels.shape)}."
                )
            batches: Iterable = [(inputs_or_loader, labels)]
        elif labels is not None:
            raise ValueError("`labels` goes with a tensor of inputs, not with a loader.")
        else:
            batches = inputs_or_loader
        features, targets, num_classes = [], [], None
        for batch in batches:
            if isinstance(batch, Mapping):
                x, y = dict_batch(batch, "inputs_or_loader")
                batch = (x, y) if y is not None else (x,)
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(
                    "`inputs_or_loader` must yield (inputs, labels) batches or dicts with "
                    f"'pixel_values' and 'labels', got {type(batch).__name__}"
                    + (" without labels." if isinstance(batch, (tuple, list)) else ".")
                )
            x, y = batch[0], _label_tensor(batch[1])
            batch_features, classes = self._features_and_classes(x)
            if num_classes is None:
                num_classes = classes
            features.append(batch_features)
            targets.append(y.to(device=features[-1].device, dtype=torch.long))
        if not features:
            raise ValueError("`inputs_or_loader` is empty.")
        return torch.cat(features), torch.cat(targets), num_classes

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the head and the feature settings to ``path``, atomically: a safetensors file
        (settings as metadata) when ``path`` ends in ``.safetensors``, else a checkpoint with
        a checksum that ``torch.load(..., weights_only=True)`` reads. Stage 1 is not saved.
        Returns the path written.

        Under ``torch.distributed`` (an initialised process group of more than one process)
        this is a collective call: *every* rank must call it (``if rank == 0:
        network.save(...)`` waits until the process group times out). Rank 0 writes, and
        every rank returns once the file is there, so that a ``load`` right after it reads
        the new file on every rank; a failed write raises on every rank (rank 0 its own
        error, the others a ``ValueError`` naming rank 0 and its message)."""
        head = self._fitted_head()
        if not isinstance(head, nn.Sequential) or len(head) != 5:
            raise TypeError(
                "save() stores the default head (make_head); save a custom head "
                "yourself with torch.save(network.head.state_dict(), ...)."
            )
        config = {
            "form": self.form,
            "k": -1 if self.k is None else int(self.k),
            "normalize": "none" if self.normalize is None else self.normalize,
            "layer": "" if self.layer is None else str(self.layer),
            "in_features": int(head[0].in_features),
            "hidden_width": int(head[0].out_features),
            "num_classes": int(head[4].out_features),
        }
        if self.layer is not None and not isinstance(self.layer, str):
            raise TypeError("save() needs `layer` as a dotted name (or None), not a module.")
        path = Path(path).expanduser()

        def write() -> None:  # rank 0 only: two ranks writing one file would race
            state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
            if path.suffix == ".safetensors":  # the settings as string metadata
                safetensors = import_optional("safetensors.torch", "saving a .safetensors file")
                with atomic_path(path) as temp:
                    safetensors.save_file(
                        state, str(temp), metadata={k: str(v) for k, v in config.items()}
                    )
            else:
                save_checkpoint({"config": config, "head": state}, path)

        written_on_main_process(write, what="IntrospectiveNetwork.save")
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        *,
        output_transform: Callable[[Any], Tensor] | None = None,
    ) -> IntrospectiveNetwork:
        """Read a network written by :meth:`save` (a ``.safetensors`` file, or a checkpoint
        read with ``weights_only`` and its checksum verified) on top of ``model`` (stage 1),
        on the model's device. ``output_transform`` (a function, so not saved) is given again
        as to the constructor, for a model that does not return (N, C) logits."""
        if Path(path).suffix == ".safetensors":
            state = _read_safetensors(Path(path).expanduser())
        else:
            state = load_checkpoint(path, argument="path", keys=_SAVED_KEYS)
        config = state["config"]
        network = cls(
            model,
            layer=config["layer"] or None,
            form=config["form"],
            # files written before `k` was refused outside "topk" may hold one it never used
            k=None if config["k"] < 0 or config["form"] != "topk" else config["k"],
            normalize=None if config["normalize"] == "none" else config["normalize"],
            hidden_width=config["hidden_width"],
            output_transform=output_transform,
        )
        with torch.random.fork_rng(devices=[]):  # its initialisation is overwritten below
            head = make_head(config["in_features"], config["num_classes"], config["hidden_width"])
        saved_dtype = next(iter(state["head"].values())).dtype  # a float64 model's head too
        head.to(dtype=saved_dtype).load_state_dict(state["head"])
        network.head = head.to(model_device(model)).eval()
        return network

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, also on a network not fitted yet: the
        usual checkpoint idiom ``IntrospectiveNetwork(model, ...).load_state_dict(
        fitted.state_dict())`` works. An unfitted network (``head`` None) given the state of
        a default head (:func:`make_head`: keys ``head.0``, ``head.2``, ``head.4``) builds
        that head first, its ``in_features`` and ``num_classes`` read from the weights' shapes,
        in the weights' dtype, on the model's device and in eval mode, as :meth:`load` does;
        its width must be the constructor's ``hidden_width``. The state dict holds the head
        only: build the network with the feature settings (``layer``, ``form``, ``k``,
        ``normalize``) it was fitted with, or use :meth:`save` / :meth:`load`, which record
        them. A custom head's state needs that head given to the constructor. A call that
        raises leaves an unfitted network unfitted."""
        unfitted = self.head is None
        if unfitted and strict:
            # a custom head's keys: torch would list them as unexpected; say why (only with
            # strict=True: with strict=False torch returns them as unexpected keys)
            given = sorted(key for key in state_dict if key.startswith("head."))
            if given and {key[len("head.") :] for key in given} != _DEFAULT_HEAD_KEYS:
                raise RuntimeError(
                    "Error(s) in loading state_dict for IntrospectiveNetwork: the network's "
                    f"head is not fitted (None), and the state dict's head ({', '.join(given)}) "
                    f"is not that of make_head{_HEAD_STATE_ADVICE}"
                )
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            if unfitted:
                self.head = None
            raise

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # runs before the children are loaded (also inside a parent module's load), so the
        # head built here is filled by torch's own loading, with its checks
        if self.head is None:
            head_prefix = prefix + "head."
            given = {
                key[len(head_prefix) :]: value
                for key, value in state_dict.items()
                if key.startswith(head_prefix)
            }
            if set(given) == _DEFAULT_HEAD_KEYS:
                head, problem = _head_for_state(given, self.hidden_width)
                if head is not None:
                    self.head = head.to(model_device(self.model)).eval()
                else:  # as a size mismatch, also with strict=False
                    error_msgs.append(problem)
            # other head keys: torch reports them as unexpected (``strict`` here is always
            # True, whatever the caller asked; load_state_dict explains them when strict)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


#: the parameters of a :func:`make_head` head, by name in the head
_DEFAULT_HEAD_KEYS = frozenset(f"{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias"))


_HEAD_STATE_ADVICE = (
    "; fit the network first, give the fitted head to the constructor "
    "(IntrospectiveNetwork(model, head=...)), or write and read the network with "
    "IntrospectiveNetwork.save() / IntrospectiveNetwork.load()."
)


def _head_for_state(state: Mapping[str, Any], hidden_width: int) -> tuple[nn.Module | None, str]:
    """The :func:`make_head` head that ``state`` (a default head's state, keys without
    ``head.``) fits, in its dtype, its initialisation drawn outside the caller's random
    stream; or None and why not (weights that are not matrices, another width than
    ``hidden_width``)."""
    first, last = state["0.weight"], state["4.weight"]
    shaped = all(
        isinstance(weight, Tensor) and weight.dim() == 2 and weight.is_floating_point()
        for weight in (first, last)
    )
    if not shaped or min(*first.shape, *last.shape) < 1:
        return None, (
            "the network's head is not fitted (None), and the state dict's head.0.weight and "
            "head.4.weight are not both non-empty floating-point matrices, so no make_head "
            f"head can be built for them{_HEAD_STATE_ADVICE}"
        )
    width, in_features = first.shape
    if width != hidden_width:
        return None, (
            f"`hidden_width`={hidden_width}, but the state dict's head is {width} wide "
            f"(head.0.weight {tuple(first.shape)}); build the network with "
            f"hidden_width={width}, or use IntrospectiveNetwork.save() / load(), which "
            "record it."
        )
    with torch.random.fork_rng(devices=[]):  # its initialisation is overwritten by the load
        head = make_head(in_features, last.shape[0], width)
    return head.to(dtype=first.dtype), ""


def _named_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """:meth:`IntrospectiveNetwork.forward`'s positional inputs, or the one given by name
    (``inputs=``, its name before it took several)."""
    if not kwargs:
        return args
    unknown = sorted(set(kwargs) - {"inputs"})
    if unknown:
        raise TypeError(
            f"IntrospectiveNetwork.forward() got an unexpected keyword argument {unknown[0]!r}."
        )
    if args:
        raise TypeError(
            "IntrospectiveNetwork.forward() got stage 1's inputs both by position and as "
            "`inputs`; give them one way."
        )
    return (kwargs["inputs"],)


def _packed_inputs(given: tuple[Any, ...]) -> Tensor | tuple[Tensor, ...]:
    """The positional arguments of :meth:`IntrospectiveNetwork.forward` as the one
    ``inputs`` (a tensor or a tuple of tensors) of the rest of the class: one argument as it
    is, several packed into a tuple (Captum calls ``forward(*inputs)``)."""
    if not given:
        raise TypeError("IntrospectiveNetwork.forward() needs `inputs`: stage 1's input tensors.")
    if len(given) == 1:
        return given[0]
    for i, value in enumerate(given):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"`inputs[{i}]` must be a torch.Tensor, got {type(value).__name__}: pass stage "
                "1's inputs as network(x, y) or network((x, y)), not both."
            )
    return tuple(given)


def _wants_input_gradient(inputs: Any) -> bool:
    """Whether the forward pass must be differentiable in ``inputs``: gradients on and an
    input tensor that requires them (Captum's gradient methods set that on their inputs)."""
    if not torch.is_grad_enabled():
        return False
    tensors = inputs if isinstance(inputs, tuple) else (inputs,)
    return any(isinstance(x, Tensor) and x.requires_grad for x in tensors)


def _frozen_state(root: nn.Module, skip: Tensor | None = None) -> dict[str, Tensor]:
    """Stage 1's parameters (detached) and buffers (fresh copies) by name, for
    ``functional_call``: a graph pass through them differentiates no parameter and updates
    only the copies (a batch norm in train mode updates its running statistics in place),
    so the user's tensors and their flags are never touched and nothing is put back in
    place afterwards (which would bump the version of a tensor the graph saved: "modified
    by an inplace operation" in the backward pass). ``skip``: a tensor left out (the weight
    the caller swaps in itself)."""
    state = {name: p.detach() for name, p in root.named_parameters() if p is not skip}
    state.update({name: b.detach().clone() for name, b in root.named_buffers() if b is not skip})
    return state


def _stage1_output(model: nn.Module, inputs: tuple[Tensor, ...], state: dict[str, Tensor]) -> Any:
    """Stage 1's output on ``inputs`` (in the model's precision, as the feature function runs
    a half model) with its parameters and buffers swapped for ``state``."""
    root = root_module(model)
    with _tensors_put_back(root):
        return functional_call(root, state, in_model_precision(model, inputs))


def _feature_graph(network: IntrospectiveNetwork, inputs: tuple[Tensor, ...]) -> Tensor:
    """The introspective features of ``inputs`` as a function of them under autograd: the
    formula of :func:`~captum_ext.introspection.introspective_features`, whose values it
    repeats up to rounding; :meth:`IntrospectiveNetwork._differentiable_features` takes
    only its gradient. The cotangents ``p - e_Q`` are those of the feature function (its
    careful float64 values) with the gradient of ``p = softmax(z)``; ``e_Q`` and the top-k
    choice are constant almost everywhere. Stage 1 runs as the feature function runs it (one
    batched pass at the final linear layer, each example alone at another layer: a batch
    norm in train mode normalises with those statistics), through :func:`_frozen_state`."""
    model, transform = network.model, network.output_transform
    root = root_module(model)
    head, _ = _resolve_head(model, network.layer, tuple(x[:2] for x in inputs), (), transform)
    calls: list[tuple[Tensor | None, Tensor | None]] = []

    def record(module, args, output):
        first = args[0] if args and isinstance(args[0], Tensor) else None
        calls.append((first, output if isinstance(output, Tensor) else None))

    with preserved_state([root, head]), gradients_on():
        with registered_hooks(call_hook(head, record)):
            out = _stage1_output(model, inputs, _frozen_state(root))
        logits = transform(out) if transform is not None else out
        # whether the closed form applies is decided on detached tensors (the comparison
        # reads scalars, which torch warns about on a tensor that requires gradients); the
        # attached h is kept for the graph
        seen = [tuple(t.detach() if t is not None else None for t in call) for call in calls]
        h = calls[0][0] if _head_features(head, logits.detach(), seen) is not None else None
        if h is None:  # another layer: its weight's per-example gradients, graph kept
            grads = _layer_gradients_with_graph(model, inputs, head, network, transform)
            if network.normalize == "per_class":
                grads = _unit(grads, (2,))
            elif network.normalize == "global":
                grads = _unit(grads, (1, 2))
            return grads.flatten(1)
        cotangents = _cotangents_with_graph(logits, network.form, network.k)
        a, b = _normalised_factors(cotangents, h.to(cotangents.dtype), network.normalize)
        a, b = a.to(logits.dtype), b.to(logits.dtype)
        return (a[..., None] * b[:, None, None, :]).flatten(1)


def _cotangents_with_graph(logits: Tensor, form: str, k: int | None) -> Tensor:
    """``p - e_Q`` of the feature function (its values), differentiable in ``logits``."""
    values = _cotangents(logits, form, k)  # (N, K, C), from detached logits
    p = torch.softmax(precise(logits), dim=1).to(values.dtype)
    rate = logits.shape[1] * p[:, None, :] if form == "all_ones" else p[:, None, :]
    return values + (rate - rate.detach()).expand_as(values)


def _layer_gradients_with_graph(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    layer: nn.Module,
    network: IntrospectiveNetwork,
    transform: Callable[[Any], Tensor] | None,
) -> Tensor:
    """``(N, K, F)``: per example (run alone, as the per-example gradient engine runs it),
    the gradients of ``<p - e_Q, z>`` for the form's classes Q with respect to ``layer``'s
    weight, differentiable in ``inputs`` (``create_graph``; a second-order derivative). The
    weight is swapped for a detached copy and the other parameters and buffers for
    :func:`_frozen_state` (``functional_call``), so that none of the model's own tensors
    takes part in the graph or is changed."""
    weight, root = _weight_of(layer), root_module(model)
    names: dict[int, str] = {}  # the first name of each tensor (the one functional_call ties)
    for n, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers()]:
        names.setdefault(id(t), n)
    if id(weight) not in names:
        raise ValueError(
            f"`layer` ({type(layer).__name__}): its weight is not a parameter of the model, "
            "so the introspective features cannot be differentiated in the inputs."
        )
    name, rows = names[id(weight)], []
    for i in range(inputs[0].shape[0]):
        own = weight.detach().requires_grad_(True)
        xs = tuple(x[i : i + 1] for x in inputs)
        # each example with its own copies of the buffers (as the per-example engine runs
        # it): a train-mode batch norm updates only those, after no graph has saved them
        out = _stage1_output(model, xs, {**_frozen_state(root, skip=weight), name: own})
        logits = transform(out) if transform is not None else out
        cotangents = _cotangents_with_graph(logits, network.form, network.k)[0]  # (K, C)
        if network.normalize is not None:  # as the feature function scales them
            dims = (1,) if network.normalize == "per_class" else (0, 1)
            largest = cotangents.detach().abs().amax(dim=dims, keepdim=True)
            cotangents = torch.where(
                largest > 0, cotangents / torch.where(largest > 0, largest, 1), 0
            )
        # the vector-Jacobian product sum_c cot_c dz_c/dW: the cotangent is the vector (not
        # differentiated in W), and with create_graph the product keeps its graph in x
        # through both the Jacobian and the cotangent (p)
        grads = []
        for row in cotangents:
            (grad,) = torch.autograd.grad(
                logits[0], own, grad_outputs=row.to(logits.dtype), create_graph=True
            )
            grads.append(grad.flatten())
        rows.append(torch.stack(grads))
    return torch.stack(rows)


_INT_SETTINGS = ("k", "in_features", "hidden_width", "num_classes")


def _read_safetensors(path: Path) -> dict[str, Any]:
    """``{"config": ..., "head": ...}`` of a ``.safetensors`` file written by ``save``."""
    if not path.is_file():
        raise ValueError(f"`path`: no file at {str(path)!r}.")
    safetensors = import_optional("safetensors", "reading a .safetensors file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            head = {key: handle.get_tensor(key) for key in handle.keys()}
        config = {k: int(v) if k in _INT_SETTINGS else v for k, v in metadata.items()}
    except Exception as error:
        raise ValueError(
            f"`path`: {str(path)!r} is not a readable introspective network "
            f"({type(error).__name__}: {error})."
        ) from error
    missing = [k for k in ("form", "normalize", "layer", *_INT_SETTINGS) if k not in config]
    if missing:
        raise ValueError(f"`path`: {str(path)!r} lacks the settings {missing}.")
    return {"config": config, "head": head}
