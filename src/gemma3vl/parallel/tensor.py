"""Tensor parallelism (Megatron-style) and sequence parallelism for the decoder, as a plan applied from outside.

What each rank holds, for ``tp`` ranks (the plan tables below say it per module):

* attention: whole KV groups. The fused QKV weight ``[K, (G+2)*hd, D]`` is ``Shard(0)``: rank r holds
  groups ``[r*K/tp, (r+1)*K/tp)``, i.e. their query heads and their key/value heads, so attention runs on
  the local heads without any communication. The output projection is row-parallel (``Shard(1)`` over the
  concatenated heads, which is the same head order) and all-reduces (or reduce-scatters) its output.
* MLP: gate/up ``[2, I, D]`` is ``Shard(1)``: each rank holds the same rows of both halves, so
  ``gelu(gate) * up`` stays local; ``down`` is row-parallel over the same rows.
* embedding: vocab-parallel (``Shard(0)`` over the vocabulary); its transpose is the output matrix of the
  tied head, so the loss is vocab-parallel too (``gemma3vl.parallel.loss``): no rank ever holds
  ``[tokens, vocab]`` logits or the whole matrix.
* norms: with ``sequence_parallel`` the residual stream between blocks is sharded over the sequence
  (``Shard(1)``) and the norms run on the local tokens (activations 1/tp); without it the stream is
  replicated. The per-head q/k norms run on the local heads (``Shard(1)`` of ``[B, H, T, hd]``), so their
  weight gradients are summed over all heads like in one process.
* untied output matrix (``lm_head``, when a checkpoint has one): ``Shard(0)`` over the vocabulary like the
  embedding, and read by the same vocab-parallel loss.
* LoRA/DoRA adapters (``gemma3vl.train.lora``) follow their projection: on a column-parallel one (QKV,
  gate/up) ``lora_B`` and DoRA's magnitude are ``Shard(0)`` like the base output rows (each projection's HF
  rows are contiguous per KV group / MLP row block, so ``Shard(0)`` of ``lora_B`` is exactly the rank's slice
  of the fused output), and ``lora_A`` is replicated; on a row-parallel one (o, down) ``lora_A`` is
  ``Shard(1)`` like the base input columns, ``lora_B`` and the magnitude are replicated, and the adapter's
  (linear) contribution is a partial sum reduced together with the base output. A replicated adapter
  tensor gets only this rank's share of its gradient, so its gradient is summed over the TP ranks in
  backward. DoRA's row norms are local under column parallelism and summed (as squares) over the TP ranks
  under row parallelism.
* vision tower and projector: replicated on every TP rank (parameters are ``Replicate()`` DTensors so that
  optimizer and clipping see one kind of tensor). SigLIP is about 0.4B parameters and FSDP shards it over the
  data-parallel ranks anyway; splitting it over TP would add two collectives per vision layer for little.

The model stays plain. A few modules need a different forward under TP, and get it the way ``fully_shard``
gives FSDP modules theirs, by swapping the instance's class for a subclass defined here:
``FusedLinear`` computes on its local shard (its forward reads the group count from the weight's shape,
which must then be the local shape), ``LoraLinear`` likewise (its fused-layout op and widths become the
local shard's), a row-parallel DoRA adapter sums its row norms over the ranks, and ``Gemma3Model.loss``
projects onto the vocab-parallel matrix.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from gemma3vl.model import Gemma3Model, TokenInfo
from gemma3vl.model.layers import FusedLinear
from gemma3vl.model.loss import IGNORE
from gemma3vl.parallel.loss import vocab_parallel_cross_entropy
from gemma3vl.train.lora import LoraAdapter, LoraLinear


# ---------------------------------------------------------------------------------------------- styles
class GroupColwiseParallel(ParallelStyle):
    """Column parallelism for a ``FusedLinear`` ``[groups, out, in]``: shard ``shard_dim`` (0: whole groups,
    1: the same rows of every group), replicate the input, give each rank its slice of the output.

    The input may arrive replicated or sequence-sharded (a local tensor, or a DTensor from
    ``PrepareModuleInput``); it is all-gathered to the full sequence. The output is a local tensor
    ``[..., local groups, local out]``.
    """

    def __init__(self, shard_dim: int, input_layout: Placement | None = None):
        self.shard_dim = shard_dim
        self.input_layout = input_layout or Replicate()

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in module.named_parameters(recurse=False):
            shard = Shard(self.shard_dim) if param.ndim > self.shard_dim else Shard(0)
            dist_param = nn.Parameter(distribute_tensor(param, mesh, [shard], src_data_rank=self.src_data_rank),
                                      requires_grad=param.requires_grad)
            module.register_parameter(param_name, dist_param)

    @staticmethod
    def _prepare_input(input_layout, module, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (input_layout,), run_check=False)
        if x.placements != (Replicate(),):
            x = x.redistribute(placements=(Replicate(),))
        # Each rank multiplies the whole input by its slice of the weight, so the gradient each rank gets for
        # the input is only its slice's share: Partial, summed (all-reduce or reduce-scatter) in backward.
        return x.to_local(grad_placements=(Partial(),))

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, LoraLinear) and module.fused:
            return self._apply_lora(module, mesh)
        if not isinstance(module, FusedLinear):
            raise TypeError(f"GroupColwiseParallel applies to FusedLinear, not {type(module).__name__}")
        distribute_module(module, mesh, self._partition, partial(self._prepare_input, self.input_layout))
        module.__class__ = LocalShardFusedLinear
        return module

    def _apply_lora(self, module: LoraLinear, mesh: DeviceMesh) -> nn.Module:
        """A fused projection with adapters: the base weight as above, each adapter's ``lora_B`` (and DoRA
        magnitude) ``Shard(0)`` (the rank's rows of its projection), ``lora_A`` replicated."""
        tp = mesh.size()

        def partition(name: str, submodule: nn.Module, mesh: DeviceMesh) -> None:
            if submodule is module:
                self._partition(name, submodule, mesh)
            elif isinstance(submodule, LoraAdapter):
                _distribute_adapter(submodule, mesh, a=Replicate(), b=Shard(0), magnitude=Shard(0),
                                    src_data_rank=self.src_data_rank)

        distribute_module(module, mesh, partition, partial(self._prepare_input, self.input_layout))
        _compute_on_local_parameters(module, mesh, summed=("lora_A.weight",))
        kv_heads = getattr(module.op, "kv_heads", None)  # FuseQKV: the local op holds this rank's KV groups
        module.op = module.op if kv_heads is None else dataclasses.replace(module.op, kv_heads=kv_heads // tp)
        module.out_features = tuple(out // tp for out in module.out_features)
        module.__class__ = LocalShardLoraLinear
        return module


class LocalShardFusedLinear(FusedLinear):
    """``FusedLinear`` whose forward runs on this rank's shard: the group count and widths come from the
    local weight, so the output is ``[..., local groups, local out]`` (e.g. this rank's KV groups)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        bias = self.bias.to_local() if isinstance(self.bias, DTensor) else self.bias
        groups, out_per_group, in_features = weight.shape
        bias = None if bias is None else bias.reshape(-1)
        y = F.linear(x, weight.reshape(groups * out_per_group, in_features), bias)
        return y.unflatten(-1, (groups, out_per_group))


class LoraRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel``, which also takes a row-parallel projection with adapters (``LoraLinear`` over an
    ``nn.Linear``): base weight ``Shard(1)``, each adapter's ``lora_A`` ``Shard(1)`` (the rank's input
    columns), ``lora_B`` and DoRA magnitude replicated. The forward runs on local tensors; base and adapter
    outputs are partial sums over the ranks, reduced together (all-reduce, or reduce-scatter over the
    sequence under SP) into ``output_layouts``."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, LoraLinear):
            return super()._apply(module, mesh)
        if module.fused or module.bias is not None:
            # every rank would add the bias to its partial sum; Gemma 3's o and down have none
            raise TypeError("LoraRowwiseParallel applies to a LoraLinear over an nn.Linear without bias")

        def partition(name: str, submodule: nn.Module, mesh: DeviceMesh) -> None:
            if submodule is module:
                module.register_parameter("weight", nn.Parameter(
                    distribute_tensor(module.weight, mesh, [Shard(1)], src_data_rank=self.src_data_rank),
                    requires_grad=module.weight.requires_grad))
            elif isinstance(submodule, LoraAdapter):
                _distribute_adapter(submodule, mesh, a=Shard(1), b=Replicate(), magnitude=Replicate(),
                                    src_data_rank=self.src_data_rank)
                if submodule.magnitude is not None:
                    submodule.__class__ = RowShardDoraAdapter
                    submodule.norm_group = mesh.get_group()

        distribute_module(module, mesh, partition, _local_input,
                          partial(_reduce_partial_output, self.output_layouts[0], self.use_local_output))
        _compute_on_local_parameters(module, mesh, summed=("lora_B.weight", "magnitude"))
        module.__class__ = LocalShardLoraLinear
        return module


class LocalShardLoraLinear(LoraLinear):
    """``LoraLinear`` on this rank's shard: its ``op`` and ``out_features`` describe the local rows (this
    rank's KV groups, its MLP rows; unchanged for a row-parallel projection), and its forward sees local
    tensors (``_compute_on_local_parameters``). Merging happens on the gathered plain model (the export)."""

    def merge(self) -> nn.Module:
        raise NotImplementedError("merge the adapters of the gathered model (gemma3vl.parallel.export), not of a shard")


class RowShardDoraAdapter(LoraAdapter):
    """A DoRA adapter of a row-parallel projection: each rank holds some input columns of every row, so the
    norm of a row is the square root of the squared norms of its pieces, summed over the TP ranks."""

    norm_group = None

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        combined = weight + self.scaling * self.lora_weight().to(weight.dtype)
        squares = combined.float().square().sum(dim=1)
        dist.all_reduce(squares, group=self.norm_group)
        return squares.sqrt().to(weight.dtype)


def _distribute_adapter(adapter: LoraAdapter, mesh: DeviceMesh, *, a: Placement, b: Placement,
                        magnitude: Placement, src_data_rank: int | None) -> None:
    for owner, name, placement in ((adapter.lora_A, "weight", a), (adapter.lora_B, "weight", b),
                                   (adapter, "magnitude", magnitude)):
        param = getattr(owner, name)
        if param is not None:
            owner.register_parameter(name, nn.Parameter(
                distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
                requires_grad=param.requires_grad))


def _local_input(module: nn.Module, inputs, mesh: DeviceMesh):
    """A row-parallel input arrives as this rank's columns (its heads, its MLP rows): used as it is."""
    x = inputs[0]
    return (x.to_local() if isinstance(x, DTensor) else x, *inputs[1:])


def _reduce_partial_output(output_layout: Placement, use_local_output: bool, module: nn.Module, output, mesh):
    output = DTensor.from_local(output, mesh, (Partial(),), run_check=False).redistribute(placements=(output_layout,))
    return output.to_local() if use_local_output else output


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity; in backward, the gradient summed over ``group``. For a replicated tensor that each rank
    applies to only its share of the work (``lora_A`` of a column-parallel projection feeds only this rank's
    output rows; ``lora_B`` of a row-parallel one only this rank's partial sum): each rank's gradient is a
    share, and their sum is the whole gradient, the same on every rank."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # (the incoming buffer may be shared)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _compute_on_local_parameters(module: nn.Module, mesh: DeviceMesh, *, summed: tuple[str, ...]) -> None:
    """Run ``module``'s forward on the local tensors of its DTensor parameters (as ``ReplicateParallel`` does),
    the gradient of those whose name ends with one of ``summed`` summed over ``mesh`` in backward."""
    module._sum_gradients = (summed, mesh.get_group())
    module.register_forward_pre_hook(_use_local_parameters)
    module.register_forward_hook(_restore_parameters, always_call=True)


class ReplicateParallel(ParallelStyle):
    """Parameters replicated on every TP rank, for modules that every TP rank runs on the same data: the
    norms without sequence parallelism, the vision tower and the projector.

    The parameters are ``Replicate()`` DTensors, so optimizer, clipping, FSDP and checkpoints see one kind of
    tensor throughout the model; but the forward runs on plain local tensors (each parameter's ``to_local()``
    is put in its place for the call, as FSDP puts its all-gathered parameters in place), because DTensor has
    no sharding rule for several ops the vision tower uses (CPU attention backward, ``avg_pool2d`` backward)
    and would only add overhead. The gradients every rank computes are the same, hence ``Replicate()``.
    """

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, mesh)  # no partition function: every parameter becomes Replicate()
        module.register_forward_pre_hook(_use_local_parameters)
        module.register_forward_hook(_restore_parameters, always_call=True)
        return module


def _use_local_parameters(module: nn.Module, args) -> None:
    swapped = []
    summed, group = getattr(module, "_sum_gradients", ((), None))
    for prefix, owner in module.named_modules():
        for name, param in owner._parameters.items():
            if isinstance(param, DTensor):
                swapped.append((owner, name, param))
                local = param.to_local()  # differentiable: the gradient reaches ``param``
                if summed and f"{prefix}.{name}".endswith(summed):
                    local = _SumGradientOverRanks.apply(local, group)
                owner._parameters[name] = local
    module._replicated_parameters = swapped


def _restore_parameters(module: nn.Module, args, output) -> None:
    for owner, name, param in getattr(module, "_replicated_parameters", ()):
        owner._parameters[name] = param
    module._replicated_parameters = []


# ---------------------------------------------------------------------------------------------- plans
def block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of one decoder block: submodule name -> style."""
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream between blocks
    norm = SequenceParallel(use_local_output=True) if sequence_parallel else ReplicateParallel()
    # attention and MLP get their input whole (all-gathered over the sequence under SP): attention reads
    # its batch and length from it. Only the first argument is a tensor to convert.
    attention_input = PrepareModuleInput(input_layouts=(stream, None, None, None, None, None),
                                         desired_input_layouts=(Replicate(), None, None, None, None, None))
    return {
        "attn_norm": norm,
        "attn": attention_input,
        "attn.qkv": GroupColwiseParallel(shard_dim=0),
        "attn.q_norm": SequenceParallel(sequence_dim=1, use_local_output=True),  # [B, H, T, hd]: local heads
        "attn.k_norm": SequenceParallel(sequence_dim=1, use_local_output=True),
        "attn.o": LoraRowwiseParallel(output_layouts=stream),
        "post_attn_norm": norm,
        "mlp_norm": norm,
        "mlp.gate_up": GroupColwiseParallel(shard_dim=1, input_layout=stream),
        "mlp.down": LoraRowwiseParallel(output_layouts=stream),
        "post_mlp_norm": norm,
    }


def model_plan(model: Gemma3Model, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan of everything outside the blocks."""
    stream = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        # Image features are written over the embeddings of the whole sequence, so the embedding output is
        # replicated; the decoder shards it over the sequence on entry and hands back full hidden states
        # for the loss (which needs every position's target).
        "text.embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "text.norm": SequenceParallel(use_local_output=True) if sequence_parallel else ReplicateParallel(),
    }
    if sequence_parallel:
        plan["text"] = PrepareModuleInputOutput(
            input_layouts=(Replicate(), None, None), desired_input_layouts=(Shard(1), None, None),
            use_local_input=True,
            output_layouts=(stream,), desired_output_layouts=(Replicate(),), use_local_output=True,
        )
    if model.text.lm_head is not None:
        plan["text.lm_head"] = VocabParallelHead()
    if model.vision is not None:
        plan["vision"] = ReplicateParallel()
        plan["projector"] = ReplicateParallel()
    return plan


class VocabParallelHead(ParallelStyle):
    """An untied output matrix ``lm_head`` [V, D]: ``Shard(0)`` over the vocabulary, like the tied embedding.
    Only its weight is used (``text.output_weight``, by the vocab-parallel loss); its forward is not."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear) or module.bias is not None:
            raise TypeError(f"VocabParallelHead applies to an nn.Linear without bias, not {module}")
        module.register_parameter("weight", nn.Parameter(
            distribute_tensor(module.weight, mesh, [Shard(0)], src_data_rank=self.src_data_rank),
            requires_grad=module.weight.requires_grad))
        return module


class TensorParallelGemma3Model(Gemma3Model):
    """``Gemma3Model`` whose loss projects the (replicated) final hidden states onto the vocab-parallel
    output matrix; everything else is the plain model. Training and evaluation go through ``loss``;
    generation under tensor parallelism is not supported (the KV cache would need the local head count)."""

    sequence_shards: int = 1  # tp under sequence parallelism: the sequence must split evenly

    def loss(self, input_ids, targets, info, pixel_values=None):
        input_ids, targets, info = pad_sequence(input_ids, targets, info, self.sequence_shards)
        hidden = self.hidden_states(input_ids, pixel_values, info=info)
        return vocab_parallel_cross_entropy(hidden, self.text.output_weight, targets, softcap=self.text.logit_softcap)


def pad_sequence(input_ids, targets, info: TokenInfo, multiple: int):
    """Pad ``[B, T]`` on the right to a multiple of ``multiple`` (each sequence-parallel rank holds an equal
    slice). The padding is segment 0 without targets: no token attends to it and it adds nothing to the loss."""
    extra = -input_ids.shape[1] % multiple
    if not extra:
        return input_ids, targets, info

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, extra), value=value)

    info = TokenInfo(positions=pad(info.positions, 0), segment_ids=pad(info.segment_ids, 0),
                     image_block_ids=pad(info.image_block_ids, -1))
    return pad(input_ids, 0), pad(targets, IGNORE), info


def apply_tensor_parallel(model: Gemma3Model, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> Gemma3Model:
    """Shard ``model`` over ``tp_mesh`` in place (see the module docstring for who holds what)."""
    if type(model) is not Gemma3Model:
        raise TypeError(f"tensor parallelism applies to a plain Gemma3Model, not {type(model).__name__}")
    # torch's SequenceParallel makes new Parameters that require a gradient whatever the old ones did: frozen
    # parameters (every base weight of a LoRA run, a frozen tower) must stay frozen.
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    for block in model.text.layers:
        parallelize_module(block, tp_mesh, block_plan(sequence_parallel))
    parallelize_module(model, tp_mesh, model_plan(model, sequence_parallel))
    for name, param in model.named_parameters():
        param.requires_grad_(trainable[name])
    model.__class__ = TensorParallelGemma3Model
    model.sequence_shards = tp_mesh.size() if sequence_parallel else 1
    return model
