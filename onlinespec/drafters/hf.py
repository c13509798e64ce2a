"""A small Hugging Face causal LM as the drafter: its weights, id and version.

Its drafts are made by :class:`onlinespec.decode.proposers.DraftRows`, for every request of a batch
that drafts with it in one forward per draft position, over a KV cache rolled back, never
rebuilt, on rejection.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from onlinespec.cpu_linear import use_small_batch_linears
from onlinespec.models import vocab_size

__all__ = ["HFDrafter"]


class HFDrafter:
    """``swap(model, version)`` replaces the weights between engine steps. A request in flight
    drafts with the new weights from the next step but keeps the keys and values its rows
    already hold (computed by the previous version): re-encoding every prefix would stall the
    engine loop at every swap, and what the drafter proposes never changes the output, only how
    much of it is accepted. New requests use the new weights only.

    Under vLLM the module stays and its parameters are overwritten in place instead
    (:meth:`onlinespec.vllm_backend.transfer.DrafterModules.load_version`), with the same effect.
    """

    def __init__(self, model: PreTrainedModel, drafter_id: str, version: int = 0):
        self.model = use_small_batch_linears(model.eval())
        self.drafter_id = drafter_id
        self.version = version
        self.vocab_size = vocab_size(model)

    def swap(self, model: PreTrainedModel, version: int) -> None:
        self.model, self.version = use_small_batch_linears(model.eval()), version
