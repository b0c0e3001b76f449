"""What dcpo adds to each vLLM worker (vLLM's `worker_extension_cls`): taking new weights
from `dcpo run`'s trainer, sent through `LLM.collective_rpc`.

Imported inside vLLM's worker processes, so it stays light: torch only, when called.
"""

from __future__ import annotations

import io


class WeightUpdates:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def dcpo_load_weights(self, blob: bytes) -> None:
        """`blob`: `torch.save` of the trainer's state dict (checkpoint names and layout).
        vLLM's in-place reload does the rest (see `VllmEngine.load_weights`)."""
        import torch

        tensors = torch.load(io.BytesIO(blob), weights_only=True)
        self.reload_weights(weights_iterator=iter(tensors.items()))
