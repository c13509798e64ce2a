"""The ``onlinespec`` weight transfer engine as vLLM's workers build it (``weight_transfer_config=
{"backend": "onlinespec"}``): vLLM's :class:`WeightTransferEngine` around
:meth:`~onlinespec.vllm_backend.transfer.DrafterModules.load_version`. Imported by vLLM's factory
only (this module needs ``vllm``); :mod:`onlinespec.vllm_backend.transfer` says what it does."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from onlinespec.vllm_backend.transfer import DrafterModules, UpdateInfo

__all__ = ["OnlineSpecInitInfo", "OnlineSpecTransferEngine", "OnlineSpecUpdateInfo"]


@dataclass
class OnlineSpecInitInfo(WeightTransferInitInfo):
    root: str | None = None  # the registry's root: every update's file must lie under it


@dataclass
class OnlineSpecUpdateInfo(UpdateInfo, WeightTransferUpdateInfo):
    pass


class OnlineSpecTransferEngine(WeightTransferEngine[OnlineSpecInitInfo, OnlineSpecUpdateInfo]):
    init_info_cls = OnlineSpecInitInfo
    update_info_cls = OnlineSpecUpdateInfo
    supports_draft_weight_update = True

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.root: str | None = None

    def init_transfer_engine(self, init_info: OnlineSpecInitInfo) -> None:
        self.root = init_info.root

    def start_weight_update(self) -> None:
        if not isinstance(self.model, DrafterModules):
            raise RuntimeError("the onlinespec weight transfer backend updates OnlineSpec's drafters only: "
                               "start the session with start_draft_weight_update (and give the proposer its "
                               "drafters first)")

    def finish_weight_update(self) -> None:
        """Nothing to finalize: each update was copied in place, checked, when it came."""

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # copies to an accelerator may still be in flight
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: OnlineSpecUpdateInfo) -> None:
        self.model.load_version(update_info.drafter, update_info.version, update_info.path, update_info.sha256,
                                root=self.root)

    def shutdown(self) -> None:
        """No connection to release: updates are files."""
