"""The server's side of the proposer: what the vLLM loop tells it and reads from it, through
vLLM's ``collective_rpc`` and the worker extension (:mod:`.worker`), once per engine step.

Calls between steps are queued (a request's assignment, a request to forget, an output suffix
speculation may copy from) and go with the step's one :meth:`ProposerLink.sync`, which brings back
every request's new per-step counts, the logs of the requests that finished and the proposer's
counters. Where vLLM's engine runs in the server's process the calls are direct; where it runs in
other processes (its engine-core process, tensor-parallel workers) they are messages of plain data,
and the answers are rank 0's (the worker whose drafts vLLM uses).
"""

from __future__ import annotations

from onlinespec.vllm_backend.proposer import DraftLog
from onlinespec.vllm_backend.worker import draft_log_from_dict

__all__ = ["ProposerLink"]


class ProposerLink:
    def __init__(self, engine, k_max: int, suffix_config=None):
        self.engine = engine
        self.k_max = k_max
        self.suffix_config = suffix_config  # SuffixConfig: copies at all (None: the drafters alone)
        self.stats: dict = {"chosen": {}, "modelled": 0, "failures": 0, "updates": 0, "update_seconds": 0.0,
                            "versions": {}}
        self._assign: list = []
        self._forget: list = []
        self._outputs: list = []
        self._new: dict[str, list] = {}
        self._logs: dict[str, DraftLog] = {}

    def setup(self, drafters: list, suffix: dict | None, dtype: str = "float32") -> bool:
        """Every worker's proposer gets its drafters (objects in process, else specs it loads)."""
        found = self.engine.collective_rpc("onlinespec_setup", kwargs={"drafters": drafters, "suffix": suffix,
                                                                       "dtype": dtype})
        return bool(found) and all(found)

    # ------------------------------------------------------------------ queued until the next sync

    def assign(self, request_id: str, drafter_id: str | None, k: int, adaptive: bool = False,
               scope: object = None, isolated: bool = False) -> None:
        self._assign.append([request_id, drafter_id, int(k), bool(adaptive), scope, bool(isolated)])

    def forget(self, request_id: str) -> None:
        """A request vLLM no longer runs (aborted): its drafting state goes, no log comes back."""
        self._forget.append(request_id)
        self._new.pop(request_id, None)

    def add_output(self, prompt: list[int], generated: list[int], scope: object = None) -> None:
        """Text suffix speculation may copy from for the next requests of ``scope``."""
        self._outputs.append([list(prompt), list(generated), scope])

    # ------------------------------------------------------------------ once per engine step

    def flush(self) -> None:
        """Send what is queued (before a step, so a new request's assignment is there for it)."""
        if self._assign or self._forget or self._outputs:
            self.sync(())

    def sync(self, finished) -> None:
        """Send what is queued; take back the new counts, the logs of ``finished`` request ids and
        the proposer's counters."""
        args = {"assign": self._assign, "forget": self._forget, "outputs": self._outputs, "finished": list(finished)}
        self._assign, self._forget, self._outputs = [], [], []
        answer = self.engine.collective_rpc("onlinespec_sync", kwargs=args)[0]
        for request_id, steps in answer["new"].items():
            self._new.setdefault(request_id, []).extend((int(d), int(a), bool(c)) for d, a, c in steps)
        for request_id, d in answer["logs"].items():
            self._logs[request_id] = draft_log_from_dict(d)
        if answer["stats"]:
            self.stats = answer["stats"]

    def take(self, request_id: str) -> list[tuple[int, int, bool]]:
        """(drafted, accepted, copied) of the request's steps since the last call."""
        return self._new.pop(request_id, [])

    def finish(self, request_id: str) -> DraftLog | None:
        """The draft log of a request that finished (synced with it in ``finished``)."""
        self._new.pop(request_id, None)
        return self._logs.pop(request_id, None)
