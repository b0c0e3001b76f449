"""What dcpo adds to each vLLM worker (vLLM's `worker_extension_cls`): taking new weights
from `dcpo run`'s trainer or `dcpo serve`'s `/load-weights`, through `LLM.collective_rpc`.

Both go through vLLM's in-place reload (`Worker.reload_weights`, the path vLLM keeps for RL
weight updates): it restores each layer's checkpoint-format parameters, loads the given
tensors through the model's own `load_weights` (fused q/k/v and gate/up, tensor-parallel
sharding, the tied head), and redoes the after-loading processing (the CPU build repacks
each linear weight there and drops the plain tensor, and with it the parameter's
`weight_loader`: calling `model.load_weights` on a processed model fails). A layer's
tensors are held until the layer has them all, then processed and copied into the engine's
own storage, so tensors given in the checkpoint's (layer) order cost one layer's worth of
memory at a time.

Imported inside vLLM's worker processes, so it stays light: torch only, when called.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable


class WeightUpdates:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def dcpo_load_weights(self, blob: bytes) -> None:
        """`blob`: `torch.save` of the trainer's state dict (checkpoint names and layout),
        from another process (see `VllmEngine.load_weights`)."""
        import torch

        tensors = torch.load(io.BytesIO(blob), weights_only=True)
        self.dcpo_load_weight_tensors(tensors.items())

    def dcpo_load_weight_tensors(self, named_tensors: Iterable) -> None:
        """(checkpoint name, tensor) pairs, consumed one at a time: colocated `dcpo run`
        (external launcher: the worker is the caller's process, so the iterator comes as
        it is and each tensor is gathered from the FSDP2 shards only when asked for)."""
        # The rotary embedding's cache is in no checkpoint; vLLM keeps it, warning
        # "RotaryEmbedding: Failed to load weights" at every reload.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=iter(named_tensors))
        finally:
            layerwise.setLevel(level)
