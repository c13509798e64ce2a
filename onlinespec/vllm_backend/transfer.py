"""OnlineSpec's weight transfer backend for vLLM: validated drafter versions reach the drafts vLLM
verifies through vLLM's own weight-update API.

vLLM updates weights at run time through ``init_weight_transfer_engine``, then per update
``start_draft_weight_update`` (the draft model is the target of the session), ``update_weights``
(one or more chunks) and ``finish_weight_update``: methods of its workers, reached through
``collective_rpc``, ``AsyncLLM`` or the HTTP routes of ``VLLM_SERVER_DEV_MODE=1``. Every built-in
transfer backend is CUDA/NCCL; this one is file based and works wherever vLLM does (CPU, GPU):

- vLLM's draft model is :class:`DrafterModules`, the proposer's drafters as one module (the
  proposer exposes it as its ``model`` once the server gave it its drafters);
- an update names a drafter, a version and that version's ``model.safetensors`` in the
  OnlineSpec registry with its sha256 (:class:`OnlineSpecUpdateInfo`); the file must lie under
  the registry root given at ``init_weight_transfer_engine`` (:class:`OnlineSpecInitInfo`);
- the weights are read once, checked (checksum, exact names and shapes, finite values; no
  pickle: :func:`onlinespec.weights.read_weights`) and copied in place into the drafter's
  parameters, on its device and in its dtype; a version that fails a check raises and leaves
  the serving weights as they were. The drafter's version label moves with its weights.

In place, not a new module: a tensor-parallel or multi-process vLLM reads the same file in every
worker, and a version is as big as the drafter's trainable weights. OnlineSpec's drafters are
Hugging Face modules run by the proposer, not modules vLLM loaded and repacked, so no layerwise
reload is needed (``start_weight_update`` and ``finish_weight_update`` have nothing to do).

:func:`register` registers the backend as ``onlinespec`` with vLLM's
``WeightTransferEngineFactory``; the package's ``vllm.general_plugins`` entry point calls it in
every vLLM process, so ``weight_transfer_config={"backend": "onlinespec"}`` works as any other
backend does.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from onlinespec.errors import CheckpointError
from onlinespec.weights import expected_shapes, read_weights

__all__ = ["BACKEND", "DrafterModules", "register"]

BACKEND = "onlinespec"

log = logging.getLogger(__name__)


def _key(drafter_id: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", drafter_id) or "_"


class DrafterModules(torch.nn.Module):
    """The drafters one proposer drafts with, as vLLM's draft model: the target of
    ``start_draft_weight_update``. ``handles`` are the server's :class:`HFDrafter` objects (the
    swap watcher, the routes and the proposer share them); their modules are registered here so
    that what vLLM does to a draft model's parameters (sleep mode) reaches them."""

    def __init__(self, drafters: dict):
        super().__init__()
        self.handles = dict(drafters)
        self.models = torch.nn.ModuleDict({_key(d): h.model for d, h in self.handles.items()})
        self.updates = 0  # versions copied in
        self.seconds = 0.0  # time spent copying them in (reading and checking included)

    def load_version(self, drafter: str, version: int, path: str, sha256: str, root: str | None = None) -> None:
        """Copy a checked version into ``drafter``'s parameters in place, then label it ``version``.
        :class:`CheckpointError` (nothing copied) for an unknown drafter, a path outside ``root``,
        a checksum, name, shape or value that is not the drafter's."""
        t0 = time.perf_counter()
        handle = self.handles.get(drafter)
        if handle is None:
            raise CheckpointError(f"no drafter {drafter!r} here (serving: {sorted(self.handles)})")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise CheckpointError(f"{drafter}: version must be a non-negative integer, got {version!r}")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise CheckpointError(f"{drafter} v{version}: sha256 must be 64 hex digits")
        file = Path(path).resolve()
        if root is not None and not file.is_relative_to(Path(root).resolve()):
            raise CheckpointError(f"{drafter} v{version}: {file} is outside the registry ({root})")
        model = handle.model
        weights = read_weights(file, sha256, f"{drafter} v{version}", expected_shapes(model))
        tied = getattr(model.config, "tie_word_embeddings", False)
        with torch.no_grad():
            missing, unexpected = model.load_state_dict(weights, strict=False)  # copies into the parameters
        if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:  # read_weights checked names
            raise CheckpointError(f"{drafter} v{version}: weights do not fit ({missing[:3]}, {unexpected[:3]})")
        handle.version = version
        self.updates += 1
        self.seconds += time.perf_counter() - t0
        log.info("%s v%d copied in place (%.3f s)", drafter, version, time.perf_counter() - t0)


def register() -> None:
    """vLLM plugin (``vllm.general_plugins`` entry point): the ``onlinespec`` transfer backend."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError:  # not in a vLLM environment: nothing to register
        return
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "onlinespec.vllm_backend.transfer_engine",
                                                    "OnlineSpecTransferEngine")


@dataclass
class UpdateInfo:
    """What one update names (the dict a caller passes to ``update_weights``)."""

    drafter: str
    version: int
    path: str
    sha256: str

    def to_dict(self) -> dict:
        return {"drafter": self.drafter, "version": self.version, "path": self.path, "sha256": self.sha256}
