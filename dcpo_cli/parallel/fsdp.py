"""FSDP2 for train-step under torchrun: `fully_shard` per decoder layer, then the root.

The root is a `Scorer`: a module whose forward is train-step's whole per-micro-batch pass
(decoder, then the chunked lm-head log-probs). train-step applies the lm-head weight itself
instead of calling the model's forward (see logprobs.py), so the root's parameters (the
embeddings, the final norm, the tied or untied head) must be gathered around exactly that
code: FSDP2 gathers a module's parameters in its forward, hence the wrapper.

Gradients: train-step's loss normalizers are the whole mini-batch's (every rank divides by
the same global counts), so the ranks' gradients must be summed; FSDP2 averages by default,
so the divide factor is set to 1.
"""

from __future__ import annotations

from typing import Any

import torch

from dcpo_cli.core.logprobs import decoder_of


class Scorer(torch.nn.Module):
    """`forward(batch, chunk_elements, with_entropy)` = `core.logprobs.logprobs_of` of
    the wrapped policy; `config` is the policy's."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def forward(self, batch, chunk_elements: int, with_entropy: bool = False,
                temperature: float = 1.0):
        from dcpo_cli.core.logprobs import logprobs_of

        return logprobs_of(self.policy, batch, chunk_elements, with_entropy, temperature)


def shard_policy(model: torch.nn.Module, cpu_offload: bool = False) -> Scorer:
    """Shard `model` in place across the process group; returns the root to call."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    if torch.cuda.is_available():  # bf16 compute, fp32 master weights and reductions
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                         reduce_dtype=torch.float32)
    else:  # CPU: fp32 throughout (the acceptance tests compare with one process)
        precision = MixedPrecisionPolicy()
    offload: Any = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for layer in decoder_of(model).layers:
        fully_shard(layer, mp_policy=precision, offload_policy=offload)
    root = Scorer(model)
    fully_shard(root, mp_policy=precision, offload_policy=offload)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over ranks, not a mean
            # a plain SUM collective (gloo has no PREMUL_SUM; NCCL's SUM is zero-copy)
            module.set_force_sum_reduction_for_comms(True)
    return root


def full_weights(model: torch.nn.Module):
    """(name, whole tensor) for every weight of `model`, by its checkpoint name: under
    FSDP2 each is gathered from the ranks' shards as it is asked for (an all-gather every
    rank runs, in the same order), so a consumer that copies each one away and drops it
    (an engine's `load_weights`) never holds a second whole copy of the model. Without
    FSDP2: the model's own tensors."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            if tensor.device.type == "cpu" and torch.cuda.is_available():  # --cpu-offload
                tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            tensor = tensor.full_tensor()
        yield name, tensor.detach()
