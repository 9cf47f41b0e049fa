"""FSDP2 (``fully_shard``): one unit per decoder block, the rest of the model in the root unit.

Units: each decoder block is its own unit (all-gathered just before it runs, freed after), and the root
unit holds the embedding (also the tied output matrix), the final norm, the vision tower and the projector.

Why the vision tower is not a unit of its own (as torchtitan makes it): a unit all-gathers when its
forward runs, and a micro-batch without images never runs the vision tower. With data parallelism one rank
may have images while another has none, and a collective that only some ranks enter hangs. The root unit is
all-gathered on every rank at the start of every step whatever the data; and a micro-batch without images
adds ``0 x`` the sum of the vision and projector parameters to its loss, so that every rank has a (zero)
gradient for them and all ranks reduce the same tensors (torch >= 2.12 has
``set_reduce_scatter_unused_params`` for this; the explicit zero works on every version). The cost is that
the root's parameters stay unsharded for the whole step (for the 4B: the 0.67B embedding and the 0.4B vision
tower, 2.1 GB in bf16).

The loss is a method of the model (``Gemma3Model.loss``), not its ``forward``; it is registered as an FSDP
forward method so the root all-gathers around it. Gradients are summed over the data-parallel ranks, not
averaged: the trainer already divides every rank's loss by the token count of the whole global batch.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from gemma3vl.model import Gemma3Model


def apply_fsdp(
    model: Gemma3Model,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
) -> Gemma3Model:
    """Shard ``model`` over ``mesh`` (1-D: FSDP; 2-D replicate x shard: HSDP) in place.

    ``param_dtype`` is the compute dtype of the all-gathered parameters (bf16 on GPUs; ``None`` keeps the
    stored dtype, as the CPU tests do); ``reduce_dtype`` the dtype gradients are summed in.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # (pinned host memory speeds up the copies to an accelerator; on a CPU mesh, gloo, there is none to pin for,
    # and pinning without an accelerator fails)
    offload: OffloadPolicy = (CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload
                              else OffloadPolicy())
    layers = list(model.text.layers)
    for index, block in enumerate(layers):
        # The last block is needed again first in backward: keeping it gathered saves one all-gather.
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    _use_image_parameters_always(model)
    register_fsdp_forward_method(model, "loss")
    if hasattr(model, "context_parallel_loss"):  # parallel.cp > 1 (gemma3vl.parallel.context)
        register_fsdp_forward_method(model, "context_parallel_loss")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM (NCCL's PREMUL_SUM would multiply by 1.0 for nothing, and gloo has no PREMUL_SUM).
            module.set_force_sum_reduction_for_comms(True)
    return model


def _use_image_parameters_always(model: Gemma3Model) -> None:
    """Make ``model.loss`` give the vision tower and projector a gradient even without images (zero then)."""
    if model.vision is None:
        return
    loss_of = model.loss  # the class's loss (TensorParallelGemma3Model's under TP)

    def loss(input_ids, targets, info, pixel_values=None):
        summed, count = loss_of(input_ids, targets, info, pixel_values)
        if pixel_values is None:
            summed = summed + unused_image_parameters_term(model)
        return summed, count

    model.loss = loss


def unused_image_parameters_term(model: Gemma3Model) -> torch.Tensor | float:
    """``0 x`` the sum of the trainable vision and projector parameters, to add to a loss that did not run the
    vision tower (so that this rank reduces a zero gradient for them like the ranks that did). Called inside
    FSDP's forward, it reads the gathered parameters, the ones that get the gradient."""
    if model.vision is None:
        return 0.0
    image_parameters = [p for part in (model.vision, model.projector) for p in part.parameters() if p.requires_grad]
    if not image_parameters:
        return 0.0
    return 0.0 * sum(_local(p).sum() for p in image_parameters)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

