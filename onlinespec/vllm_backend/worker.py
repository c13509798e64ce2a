"""The server's calls to OnlineSpec's proposer, as methods of vLLM's workers (a worker extension).

vLLM adds the methods of ``parallel_config.worker_extension_cls`` to its worker class; the
server calls them by name through ``collective_rpc``, as vLLM's own RLHF examples do. Their
arguments and answers are plain data (ids, numbers, lists, dicts), so the proposer may live in
the server's process (vLLM's engine in process: the calls are direct) or in other processes
(vLLM's engine-core process; every tensor-parallel worker, each with its own proposer and its
own copy of the drafters, rank 0's drafts being the ones vLLM uses):

- :meth:`OnlineSpecWorker.onlinespec_setup`: the drafters (built here from their registry
  folder or model spec, or, in process, the server's own objects), suffix speculation's settings;
- :meth:`OnlineSpecWorker.onlinespec_sync`: once per engine step, everything queued since the
  last call (requests' assignments, requests to forget, outputs suffix speculation may copy
  from) in, and out the per-step draft counts of every request, the draft logs of the finished
  ones and the proposer's counters.

New drafter versions go through vLLM's own weight-update API (:mod:`.transfer`), not through here.
"""

from __future__ import annotations

import logging

from onlinespec.vllm_backend.proposer import DraftLog, OnlineSpecProposer

__all__ = ["EXTENSION", "OnlineSpecWorker", "draft_log_from_dict", "draft_log_to_dict", "load_drafter"]

EXTENSION = "onlinespec.vllm_backend.worker.OnlineSpecWorker"

log = logging.getLogger(__name__)


def draft_log_to_dict(d: DraftLog) -> dict:
    return {"drafter_id": d.drafter_id, "drafter_version": d.drafter_version,
            "blocks": [[list(map(int, drafts)), int(e), int(a)] for drafts, e, a in d.blocks],
            "copied_blocks": d.copied_blocks, "mismatches": d.mismatches, "start": d.start}


def draft_log_from_dict(d: dict) -> DraftLog:
    return DraftLog(d["drafter_id"], int(d["drafter_version"]),
                    [(list(drafts), int(e), int(a)) for drafts, e, a in d["blocks"]],
                    int(d["copied_blocks"]), int(d["mismatches"]),
                    int(d["start"]) if d.get("start") is not None else None)


def load_drafter(spec: dict, device: str = "cpu", dtype: str = "float32"):
    """An :class:`HFDrafter` from ``{"id", "version", "dir"}`` (a registry version's folder, checked
    as the registry checks it) or ``{"id", "version", "model"}`` (a model spec, e.g. a path)."""
    import torch

    from onlinespec.drafters.hf import HFDrafter
    from onlinespec.weights import load_version

    torch_dtype = getattr(torch, dtype)
    if spec.get("dir"):
        model = load_version(spec["dir"], f"{spec['id']} v{spec['version']}").to(device=device, dtype=torch_dtype)
    else:
        from onlinespec.models import load_model

        model = load_model(spec["model"], dtype=torch_dtype, device=device)
    return HFDrafter(model, spec["id"], version=int(spec["version"]))


class OnlineSpecWorker:
    """vLLM worker extension (``worker_extension_cls``): mixed into vLLM's worker class, so
    ``self.model_runner`` is the worker's model runner and ``self.model_runner.drafter`` the
    :class:`OnlineSpecProposer` vLLM built from ``speculative_config``."""

    def _proposer(self) -> OnlineSpecProposer | None:
        proposer = getattr(self.model_runner, "drafter", None)
        return proposer if isinstance(proposer, OnlineSpecProposer) else None

    def onlinespec_setup(self, drafters: list, suffix: dict | None = None, dtype: str = "float32") -> bool:
        """Give the proposer its model runner (for the rows' request ids), its drafters and suffix
        speculation's settings; False where this worker runs no OnlineSpec proposer. Each entry of
        ``drafters`` is an :class:`HFDrafter` (in process: the server's own, shared) or a spec
        :func:`load_drafter` reads, onto this worker's device."""
        proposer = self._proposer()
        if proposer is None:
            return False
        proposer.runner = self.model_runner
        device = str(getattr(self, "device", "cpu"))  # the worker's: drafters run where its model does
        handles = {}
        for d in drafters:
            handle = d if not isinstance(d, dict) else load_drafter(d, device, dtype)
            handles[handle.drafter_id] = handle
        proposer.serve(handles)
        if suffix is not None:
            from onlinespec.decode.suffix import SuffixCache, SuffixConfig

            proposer.suffix_config = SuffixConfig.from_dict(suffix)
            proposer.suffix = SuffixCache(proposer.suffix_config)
        log.info("OnlineSpec proposer ready: drafters %s, suffix speculation %s", sorted(handles),
                 "on" if suffix is not None else "off")
        return True

    def onlinespec_sync(self, assign: list | None = None, forget: list | None = None, outputs: list | None = None,
                        finished: list | None = None) -> dict:
        """In: ``assign`` ``[request_id, drafter_id or None, k, adaptive, scope, isolated]`` per new
        request; ``forget``: request ids to drop without a log (aborted); ``outputs``: ``[prompt,
        generated, scope]`` suffix speculation may copy from; ``finished``: request ids whose logs
        to hand back. Out: ``new`` (request id -> its steps' ``[drafted, accepted, copied]`` since
        the last call), ``logs`` (request id -> draft log), ``stats``."""
        proposer = self._proposer()
        if proposer is None:
            return {"new": {}, "logs": {}, "stats": {}}
        handles = proposer.model.handles if getattr(proposer, "model", None) is not None else {}
        for request_id, drafter_id, k, adaptive, scope, isolated in assign or ():
            proposer.assign(request_id, handles.get(drafter_id) if drafter_id is not None else None, k,
                            adaptive=adaptive, scope=scope, isolated=isolated)
        for request_id in forget or ():
            proposer.finish(request_id)
        if proposer.suffix is not None:
            for prompt, generated, scope in outputs or ():
                proposer.suffix.add_output(list(prompt), list(generated), scope)
        new = {}
        for request_id in list(proposer._rows):
            steps = proposer.take(request_id)
            if steps:
                new[request_id] = [[d, a, bool(c)] for d, a, c in steps]
        logs = {}
        for request_id in finished or ():
            draft_log = proposer.finish(request_id)
            if draft_log is not None:
                logs[request_id] = draft_log_to_dict(draft_log)
        model = getattr(proposer, "model", None)
        stats = {"chosen": {str(k): n for k, n in proposer.step_k.chosen.items()},
                 "modelled": proposer.step_k.modelled, "failures": proposer.failures,
                 "updates": model.updates if model is not None else 0,
                 "update_seconds": model.seconds if model is not None else 0.0,
                 "versions": {d: h.version for d, h in handles.items()}}
        return {"new": new, "logs": logs, "stats": stats}
