"""What dcpo adds to each vLLM worker (vLLM's `worker_extension_cls`): taking new weights
from `dcpo run`'s trainer, sent through `LLM.collective_rpc`.

Imported inside vLLM's worker processes, so it stays light: torch only, when called.
"""

from __future__ import annotations

import io
import logging


class WeightUpdates:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def dcpo_load_weights(self, blob: bytes) -> None:
        """`blob`: `torch.save` of the trainer's state dict (checkpoint names and layout).
        vLLM's in-place reload does the rest (see `VllmEngine.load_weights`)."""
        import torch

        tensors = torch.load(io.BytesIO(blob), weights_only=True)
        # The rotary embedding's cache is in no checkpoint; vLLM keeps it, warning
        # "RotaryEmbedding: Failed to load weights" at every reload.
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = layerwise.level
        layerwise.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=iter(tensors.items()))
        finally:
            layerwise.setLevel(level)

    def dcpo_load_weight_tensors(self, named_tensors: list) -> None:
        """Colocated `dcpo run` (external launcher: the worker is the caller's process, so
        the tensors come as they are): a few of the trainer's weights, by checkpoint name,
        through the model's own loader (fused q/k/v, tensor-parallel sharding, tied head)."""
        self.model_runner.model.load_weights(weights=iter(named_tensors))
