"""The amortised training loop of :class:`~captum_ext.attr.ActivationMatchingMask` (private).

``ActivationMatchingMask.fit`` delegates here: data order, checkpoints and resumption,
torch.distributed sharding, and one Adam step per batch on the method's objective. The
method object supplies the objective and the model guard (``_frozen_model``,
``_objective``, ``_reference``, ``_baseline_for``, ``_default_net``, ``_check_images``).
Also the seeding helpers that the per-image optimisation shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils.batches import dict_batch
from .._utils.distributed import (
    agreed_batches,
    checked_on_every_rank,
    dataset_fingerprint,
    written_on_main_process,
)
from .._utils.layers import root_module
from .._utils.model_state import gradients_on, module_state, restore_module_state
from .._utils.seeding import as_generator, initialised_cuda_devices, seed_generators
from .._utils.training import (
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
from .._utils.validation import check_flag, check_int, check_number
from ._mask_net import MaskUNet, unet_config_from_state_dict


def check_lr(value: Any) -> float:
    """A positive, finite learning rate."""
    return check_number(value, "lr")


def resolve_seed(generator: Any, seed: Any) -> int:
    """One integer seed from which every random draw of a call is derived."""
    if generator is not None and seed is not None:
        raise ValueError("give either `generator` or `seed`, not both.")
    generator = as_generator(generator)  # an int is a seeded generator, as everywhere
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if seed is None:
        return 0
    return check_int(seed, "seed", minimum=0)


def derived_seed(base: int, *keys: int) -> int:
    value = base
    for key in keys:
        value = (value * 1_000_003 + key + 1) % (2**62)
    return value


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        return dict_batch(batch, "data")[0]
    if (
        isinstance(batch, list | tuple)
        and batch
        and isinstance(batch[0], list | tuple)
        and batch[0]
        and all(isinstance(x, Tensor) for x in batch[0])
    ):
        # ((images, meta), labels): the inputs of a model with several inputs
        raise ValueError(
            f"`data` yields batches whose first element is a {type(batch[0]).__name__} of "
            f"{len(batch[0])} (several inputs of the model); ActivationMatchingMask trains its "
            "mask net on images (N, C, H, W) and calls the model with the images alone: "
            "models with several inputs are not supported."
        )
    raise TypeError(
        "`data` must yield image tensors or (images, ...) tuples, got a batch of type "
        f"{type(batch).__name__}."
    )


def _is_tensor_batch(data: Any) -> bool:
    """A tuple ``(images, labels, ...)`` of tensors with the examples first (images
    N x C x H x W), as the other methods take it; a tuple of single images stays a dataset."""
    batch = (
        isinstance(data, tuple)
        and len(data) > 0
        and all(isinstance(t, Tensor) and t.dim() > 0 for t in data)
        and data[0].dim() == 4
    )
    if batch and any(t.shape[0] != data[0].shape[0] for t in data):
        raise ValueError(
            "`data`: the tensors of an (images, labels, ...) tuple must hold one entry per "
            f"example, got first dimensions {[int(t.shape[0]) for t in data]}."
        )
    return batch


def fit_mask_net(
    method,
    data,
    *,
    epochs,
    lr,
    batch_size,
    progress,
    checkpoint,
    checkpoint_every,
    resume,
    generator,
    seed,
) -> Any:
    """Train ``method``'s amortised mask net: the body of ``ActivationMatchingMask.fit``,
    whose signature and docstring give the arguments (all required here)."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    shard = distributed_shard()
    rank, world = shard if shard is not None else (0, 1)
    # under torch.distributed every check before the first collective (the seed's broadcast,
    # DDP's) ends in one gathering step: a failure on one process raises on every process,
    # and processes given different datasets are refused (with different lengths they took
    # different numbers of steps, and one waited in DDP's all-reduce until the process group
    # timed out)
    with checked_on_every_rank("ActivationMatchingMask.fit") as agreement:
        if _is_tensor_batch(data):  # (images, labels, ...) as tensors: their examples
            data = TensorDataset(*data)
        epochs = check_int(epochs, "epochs")
        progress = check_flag(progress, "progress")
        resume = check_flag(resume, "resume")
        lr_given = lr is not None
        lr = check_lr(3e-4 if lr is None else lr)
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
        if isinstance(data, DataLoader):
            dataset = data.dataset
            loader_args = {
                "batch_size": data.batch_size,
                "collate_fn": data.collate_fn,
                "drop_last": data.drop_last,
                "num_workers": data.num_workers,
            }
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__")
        ):
            dataset = data
            loader_args = {"batch_size": 32, "drop_last": False}
        else:
            raise TypeError(
                f"`data` must be a DataLoader or a map-style Dataset, got {type(data).__name__}."
            )
        if batch_size is not None:
            loader_args["batch_size"] = check_int(batch_size, "batch_size")
        if loader_args["batch_size"] is None:
            raise ValueError("`data` has batch_size=None; pass `batch_size`.")
        if len(dataset) == 0:
            raise ValueError("`data` is empty.")
        if resume and checkpoint is None:
            raise ValueError("`resume`=True needs a `checkpoint` path.")
        writable_path_argument(checkpoint, "checkpoint")  # before any step, not at the first save
        base_seed = resolve_seed(generator, seed)
        # read here, before the loop swaps a half-precision model's forward_func for a wrapper
        objective = objective_settings(method)
        state = None
        if resume and Path(checkpoint).expanduser().is_file():
            state = load_checkpoint(checkpoint, argument="checkpoint")
            for key in ("mask_net", "optimizer", "step", "epoch", "batch", "seed"):
                if key not in state:
                    raise ValueError(f"`checkpoint` is not a mask-net checkpoint (no {key!r}).")
            if state.get("world_size", 1) != world:
                raise ValueError(
                    f"`checkpoint` was written by {state.get('world_size')} processes; resume "
                    f"it with the same number, not {world}."
                )
            saved_batch = int(state.get("batch_size", loader_args["batch_size"]))
            # a resumed fit follows the checkpoint's order: a different request was ignored
            if batch_size is not None and loader_args["batch_size"] != saved_batch:
                raise ValueError(
                    f"`batch_size`={loader_args['batch_size']}, but `checkpoint` was written with "
                    f"{saved_batch}; resume with the same batch size (or leave it out)."
                )
            if seed is not None and base_seed != int(state["seed"]):
                raise ValueError(
                    f"`seed`={seed}, but `checkpoint` was written with another seed; resume with "
                    "the same one (or leave it out: the checkpoint's is used)."
                )
            saved_lr = float(state["optimizer"]["param_groups"][0]["lr"])
            if lr_given and lr != saved_lr:  # the optimiser's state would set it back
                raise ValueError(
                    f"`lr`={lr}, but `checkpoint` was written with {saved_lr}; resume with the "
                    "same learning rate (or leave it out: the checkpoint's is used)."
                )
            saved_epoch, saved_position = int(state["epoch"]), int(state["batch"])
            if epochs < saved_epoch or (epochs == saved_epoch and saved_position > 0):
                # the loop would not run, and the longer-trained net would come back as it is
                held = f"{saved_epoch} epoch{'' if saved_epoch == 1 else 's'}" + (
                    f" and {saved_position} step{'' if saved_position == 1 else 's'} of the next"
                    if saved_position
                    else ""
                )
                raise ValueError(
                    f"`epochs`={epochs}, but `checkpoint` already holds {held} "
                    f"({int(state['step'])} steps); resume with `epochs` >= "
                    f"{saved_epoch + (1 if saved_position else 0)}, or start a new fit without "
                    "`resume`."
                )
            # a checkpoint written before the objective was recorded: the settings it was fitted
            # with cannot be told (they were the user's, not necessarily the defaults), so they
            # are not compared, as before
            saved_objective = state.get("objective")
            differ = (
                [] if saved_objective is None else objective_differences(objective, saved_objective)
            )
            if differ:
                raise ValueError(
                    f"`resume`: the objective settings {', '.join(differ)} differ from those "
                    "`checkpoint` was written with; build the ActivationMatchingMask with the "
                    "same settings to resume, or start a new fit without `resume`."
                )
            base_seed = int(state["seed"])
            loader_args["batch_size"] = saved_batch
            lr = saved_lr
        if shard is not None:
            agreement.same_data("`data`", len(dataset), dataset_fingerprint(dataset))
    if shard is not None:  # a generator's draw: rank 0's (a resumed fit's seed is the same)
        import torch.distributed as dist

        box = [base_seed]
        dist.broadcast_object_list(box, src=0)
        base_seed = int(box[0])

    model = root_module(method.forward_func)
    device = next((p.device for p in model.parameters()), None) if model is not None else None

    def order(epoch: int) -> list[int]:
        if shard is not None:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=base_seed
            )
            sampler.set_epoch(epoch)
            return list(sampler)
        permutation = torch.randperm(
            len(dataset), generator=torch.Generator().manual_seed(base_seed + epoch)
        )
        return permutation.tolist()

    batch = loader_args["batch_size"]
    drop_last = loader_args.get("drop_last", False)
    per_epoch = len(order(0))
    batches_per_epoch = per_epoch // batch if drop_last else -(-per_epoch // batch)
    if batches_per_epoch == 0:
        raise ValueError("`batch_size` is larger than the data with drop_last=True.")

    # with a checkpoint, an interrupted call leaves a given mask net as it was, so that
    # resume=True continues from the file (or from the start), not from a partial state.
    # The loop runs on a fork of torch's global RNG (CPU and initialised CUDA devices),
    # seeded at every step from (seed, step, rank): a mask net with random layers (dropout)
    # draws the same numbers whatever the caller's random state, which is left as it was,
    # and a resumed fit draws those of an uninterrupted one.
    with (
        undone_on_failure(checkpoint is not None, lambda: _mask_net_copy(method), _put_back),
        method._frozen_model(),
        torch.random.fork_rng(devices=initialised_cuda_devices()),
    ):
        step = int(state["step"]) if state else 0
        start_epoch = int(state["epoch"]) if state else 0
        start_batch = int(state["batch"]) if state else 0
        history = list(state.get("history", [])) if state else []
        net = optimiser = wrapped = None
        bar = progress_bar(
            epochs * batches_per_epoch,
            bool(progress),
            desc="mask net",
            unit="step",
            initial=min(step, epochs * batches_per_epoch),
        )

        def write_checkpoint(epoch: int, next_batch: int) -> None:
            """Rank 0 writes; every rank returns once it has (a failed write raises on
            every rank). Without a checkpoint: a barrier."""
            if checkpoint is None:
                barrier()
                return
            written = {
                "mask_net": unwrap_distributed(net).state_dict(),
                "optimizer": optimiser.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch": next_batch,
                "seed": base_seed,
                "batch_size": batch,
                "world_size": world,
                "history": history,
                "objective": objective,
            }
            written_on_main_process(
                lambda: save_checkpoint(written, checkpoint), what="writing the checkpoint"
            )

        def prepared(item: tuple[int, Any]) -> tuple[int, Tensor]:
            position, raw = item
            x = batch_inputs(raw)
            if device is not None:
                x = x.to(device)
            return position, method._working_images(method._check_images(x))

        try:
            for epoch in range(start_epoch, epochs):
                indices = order(epoch)
                skip = start_batch if epoch == start_epoch else 0
                loader = DataLoader(
                    dataset,
                    sampler=indices[skip * batch :],
                    # its own generator: a loader without one draws its workers' base seed
                    # from (and so advances) the caller's global RNG
                    generator=seeded_generator(
                        torch.device("cpu"), derived_seed(base_seed, epoch, 3)
                    ),
                    **{k: v for k, v in loader_args.items()},
                )
                # a batch that fails its checks on one process (a NaN image in its shard)
                # raises on every process, not only there while the others wait in DDP
                for position, x in agreed_batches(
                    enumerate(loader, start=skip), prepared, what="ActivationMatchingMask.fit"
                ):
                    if net is None:
                        net, optimiser, wrapped = training_net(
                            method, x, base_seed, lr, state, checkpoint
                        )
                    seed_generators(
                        derived_seed(base_seed, step, rank, 1),
                        [x.device] if x.device.type == "cuda" else [],
                    )
                    loss = method._train_step(
                        x, net, wrapped, optimiser, base_seed, step, rank, world
                    )
                    history.append(loss)
                    step += 1
                    if bar:
                        bar.update(1)
                    last = position + 1 == batches_per_epoch
                    if step % checkpoint_every == 0 or (last and epoch == epochs - 1):
                        if last:
                            write_checkpoint(epoch + 1, 0)
                        else:
                            write_checkpoint(epoch, position + 1)
        finally:
            if bar:
                bar.close()
    if net is None and state is not None:  # resumed a finished run: just load it
        net, _, _ = training_net_from_state(method, state, checkpoint)
    if net is not None:
        method.mask_net = unwrap_distributed(net).eval()  # trained: as it predicts
        method._trained = True
    method.history = history
    return method


#: the objective settings of a checkpoint written before they were recorded: the
#: constructor's defaults (``layers`` has none, so it is not compared then)
_OBJECTIVE_DEFAULTS = {"baseline": 0.0, "necessity_margin": 1.0}
_DEFAULT_PRESET = "mnist"


def objective_settings(method) -> dict[str, Any]:
    """The settings that shape the loss of ``method``'s fit, as plain values that a
    ``weights_only`` checkpoint holds and that compare exactly: the loss weights as a dict
    (floats, and the two bool switches), the layers as their dotted names in the model with
    their weights, the baseline as a float or a CPU tensor, and the necessity margin."""
    model = root_module(method.forward_func)
    names: dict[int, str] = {}
    if model is not None:
        for name, module in unwrap_distributed(model).named_modules():
            names.setdefault(id(module), name)
    # a layer outside the model (a plain-function forward_func) is known by its class only
    layers = [names.get(id(layer), f"<{type(layer).__qualname__}>") for layer in method.layers]
    baseline = method.baseline
    return {
        "weights": _plain_weights(method.weights),
        "layers": layers,
        "layer_weights": [float(weight) for weight in method.layer_weights],
        "baseline": (
            baseline.detach().to("cpu").clone() if isinstance(baseline, Tensor) else float(baseline)
        ),
        "necessity_margin": float(method.necessity_margin),
    }


def _plain_weights(weights: Any) -> dict[str, float | bool]:
    return {
        field.name: (
            value if isinstance(value := getattr(weights, field.name), bool) else float(value)
        )
        for field in fields(weights)
    }


def objective_differences(own: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """The settings in ``own`` (:func:`objective_settings`) that differ from the
    checkpoint's ``saved`` ones, as "`name`=value (the checkpoint's: value)". A setting the
    checkpoint lacks (written before it was recorded) is compared with its default, as TIE
    does."""
    from .activation_matching import WEIGHT_PRESETS, MaskLossWeights  # imports this module

    if "weights" in saved:  # a weight added since: the fit ran with its default
        saved_weights = {
            field.name: field.default
            for field in fields(MaskLossWeights)
            if field.default is not MISSING
        }
        saved_weights.update(saved["weights"])
    else:
        saved_weights = _plain_weights(WEIGHT_PRESETS[_DEFAULT_PRESET])
    differ = [
        f"`weights[{name!r}]`={value!r} (the checkpoint's: {saved_weights.get(name)!r})"
        for name, value in own["weights"].items()
        if saved_weights.get(name) != value
    ]
    # a checkpoint without them: the layers cannot be told (they have no default), their
    # weights were 1 (the default of a list of layers)
    saved_layers = [str(name) for name in saved.get("layers", own["layers"])]
    saved_layer_weights = [float(w) for w in saved.get("layer_weights", [1.0] * len(saved_layers))]
    if saved_layers != own["layers"] or saved_layer_weights != own["layer_weights"]:
        differ.append(
            f"`layers`={_layers_described(own['layers'], own['layer_weights'])} (the "
            f"checkpoint's: {_layers_described(saved_layers, saved_layer_weights)})"
        )
    saved_baseline = saved.get("baseline", _OBJECTIVE_DEFAULTS["baseline"])
    if not _same_baseline(own["baseline"], saved_baseline):
        differ.append(
            f"`baseline`={_described(own['baseline'])} (the checkpoint's: "
            f"{_described(saved_baseline)})"
        )
    saved_margin = float(saved.get("necessity_margin", _OBJECTIVE_DEFAULTS["necessity_margin"]))
    if saved_margin != own["necessity_margin"]:
        differ.append(
            f"`necessity_margin`={own['necessity_margin']!r} (the checkpoint's: {saved_margin!r})"
        )
    return differ


def _layers_described(names: list[str], weights: list[float]) -> str:
    """A list of names when every weight is 1, else the {name: weight} dict."""
    if all(weight == 1.0 for weight in weights):
        return repr(names)
    return repr(dict(zip(names, weights)))


def _same_baseline(a: float | Tensor, b: float | Tensor) -> bool:
    """Exactly the same baseline image: numbers by value, tensors (or a number and a tensor)
    by their values broadcast to one shape, in the narrowest float dtype of the tensors
    given (a number 0.1 and a float32 tensor of 0.1 are one baseline: the fit casts it to
    the images' dtype either way)."""
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return float(a) == float(b)
    dtypes = [v.dtype for v in (a, b) if isinstance(v, Tensor) and v.is_floating_point()]
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float64)
    a, b = (
        (v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)).to(
            device="cpu", dtype=dtype
        )
        for v in (a, b)
    )
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        return False
    return torch.equal(a.expand(shape), b.expand(shape))


def _described(baseline: float | Tensor) -> str:
    if isinstance(baseline, Tensor):
        if baseline.numel() == 1:
            return f"a tensor of shape {tuple(baseline.shape)} holding {baseline.item()!r}"
        return f"a tensor of shape {tuple(baseline.shape)}"
    return repr(float(baseline))


def mask_net_channels(net: nn.Module) -> int | None:
    """The number of image channels ``net`` takes where it is known: a :class:`MaskUNet`'s
    ``in_channels``. None for a user's own net: its first registered convolution need not be
    the first to run, nor see the images' channels (a net may reduce them first), so a
    guess could refuse a net that works."""
    net = unwrap_distributed(net)
    return int(net.in_channels) if isinstance(net, MaskUNet) else None


def check_mask_net_channels(net: nn.Module, x: Tensor, images: str) -> None:
    """Refuse a mask net made for another number of channels than the images ``x`` (named
    ``images`` in the message), before torch's convolution error deep inside the net."""
    channels = mask_net_channels(net)
    if channels is not None and channels != x.shape[1]:
        raise ValueError(
            f"`mask_net` takes {channels}-channel images (the in_channels of its first "
            f"convolution), but {images} have {x.shape[1]} channels (shape {tuple(x.shape)}); "
            f"use a mask net made for {x.shape[1]}-channel images (mask_net=None trains a "
            "new one), or images like those the mask net was trained on."
        )


def _mask_net_copy(method) -> tuple:
    net = method.mask_net
    saved = None if net is None else module_state(unwrap_distributed(net))
    return method, net, saved, method._trained, list(method.history)


def _put_back(snapshot: tuple) -> None:
    method, net, saved, trained, history = snapshot
    if net is not None:
        restore_module_state(saved)
    method.mask_net, method._trained, method.history = net, trained, history


def _checkpoint_named(checkpoint) -> str:
    return f"`checkpoint`: {str(Path(checkpoint).expanduser())!r}"


def training_net_from_state(method, state, checkpoint):
    config = unet_config_from_state_dict(state["mask_net"])
    if method.mask_net is None:
        dtype = next(iter(state["mask_net"].values())).dtype
        with torch.random.fork_rng(devices=[]):
            method.mask_net = MaskUNet(**config).to(dtype=dtype)
    load_fitting_state(method.mask_net, state["mask_net"], _checkpoint_named(checkpoint))
    return method.mask_net, None, None


def training_net(method, x: Tensor, base_seed: int, lr: float, state, checkpoint=None):
    if method.mask_net is None:
        net = method._default_net(x, derived_seed(base_seed, 0, 0))
    else:
        check_mask_net_channels(method.mask_net, x, "the images of `data`")
        net = method.mask_net.to(device=x.device, dtype=x.dtype)  # undone if the fit fails
    if state is not None:  # every key and shape checked before anything is copied
        load_fitting_state(net, state["mask_net"], _checkpoint_named(checkpoint))
    net.train()
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    if state is not None:
        optimiser.load_state_dict(state["optimizer"])
    wrapped = wrap_distributed(net)
    method.mask_net = net
    return net, optimiser, wrapped


def train_step(method, x, net, wrapped, optimiser, base_seed, step, rank, world) -> float:
    baseline = method._baseline_for(x)
    with torch.no_grad():
        reference = method._reference(x)
    targets = reference.logits.argmax(1)
    noise_gen = seeded_generator(x.device, derived_seed(base_seed, step, rank + 2))
    noise = torch.randn(x.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
    with gradients_on():
        loss, *_ = method._objective(wrapped, x, targets, reference, baseline, noise)
        if wrapped is net:
            params = [p for p in net.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params)
            for param, grad in zip(params, grads):
                param.grad = grad
        else:  # DistributedDataParallel averages the gradients in backward
            loss.backward()
    optimiser_step(optimiser)
    optimiser.zero_grad(set_to_none=True)
    return float(loss.detach())
