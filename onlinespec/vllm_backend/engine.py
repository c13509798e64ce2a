"""Starting vLLM's engine for a service config, with OnlineSpec's proposer inside it."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from onlinespec.errors import ModelLoadError
from onlinespec.vllm_backend.transfer import BACKEND, UpdateInfo, register
from onlinespec.vllm_backend.worker import EXTENSION

__all__ = ["PROPOSER", "engine_args", "start_engine", "update_drafter"]

log = logging.getLogger(__name__)

PROPOSER = "onlinespec.vllm_backend.proposer.OnlineSpecProposer"


def engine_args(cfg, model_path: str, speculate: bool = True, **overrides) -> dict:
    """vLLM's engine arguments for a service config (``serving.vllm``, the limits of ``serving``)."""
    s, v = cfg.serving, cfg.serving.vllm
    args = dict(
        model=model_path, tokenizer=model_path, served_model_name=cfg.target_id,
        dtype=s.dtype if s.dtype != "float32" else "float32",
        max_model_len=v.max_model_len or s.max_prompt_tokens + s.max_tokens,
        max_num_seqs=s.max_active,
        max_logprobs=max(20, s.feedback_topk),
        gpu_memory_utilization=v.gpu_memory_utilization,
        enforce_eager=v.enforce_eager,
        seed=0,
        disable_log_stats=False,  # vLLM's own counters (vllm:spec_decode_*), shown on /metrics
        # response_format through llguidance, as the embedded engine, its JSON without free whitespace
        # (a small model pads a schema's JSON with blanks forever otherwise; vLLM reads this here,
        # not per request, and only for a named backend)
        structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True},
    )
    if not s.prefix_cache_tokens:  # vLLM's own prefix caching (in its KV cache, on by default) off too
        args["enable_prefix_caching"] = False
    if v.kv_cache_memory_bytes:
        args["kv_cache_memory_bytes"] = v.kv_cache_memory_bytes
    if v.tensor_parallel_size > 1:
        args["tensor_parallel_size"] = v.tensor_parallel_size
    args.update(overrides)
    if speculate:
        args["speculative_config"] = {"method": "custom_class", "model": PROPOSER,
                                      "num_speculative_tokens": v.num_speculative_tokens}
        # new drafter versions arrive through vLLM's weight-update API (onlinespec.vllm_backend.transfer)
        args["weight_transfer_config"] = {"backend": BACKEND}
        # the server's calls to the proposer, by name, wherever vLLM runs it (onlinespec.vllm_backend.worker)
        args["worker_extension_cls"] = EXTENSION
    return args


def start_engine(cfg, model_path: str, speculate: bool = True, drafters: dict | None = None,
                 drafter_specs: list[dict] | None = None, registry_root: str | None = None, **overrides):
    """(vLLM's ``LLMEngine``, a :class:`ProposerLink` to OnlineSpec's proposer inside it, or None
    without speculation).

    With ``serving.vllm.in_process`` (the default) the engine core and its model runner run in this
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and the proposer drafts with the server's own
    ``drafters`` (id -> HFDrafter: no second copy). Otherwise (``multiprocessing``, or
    ``tensor_parallel_size`` > 1) each worker builds its own from ``drafter_specs``
    (:func:`~onlinespec.vllm_backend.worker.load_drafter`). Either way the drafters become vLLM's
    draft model, updated through its weight-update API with the ``onlinespec`` transfer backend,
    from files under ``registry_root`` only (:func:`update_drafter`)."""
    v = cfg.serving.vllm
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if not v.multiprocessing else "1"
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as exc:
        raise ModelLoadError(
            "serving.engine is vllm but vLLM is not installed in this environment: run ./run vllm-setup "
            f"and serve with .venv-vllm/bin/onlinespec serve ({exc})") from exc
    from onlinespec.vllm_backend.link import ProposerLink

    register()  # the entry point does this where OnlineSpec is installed; a source checkout may not be
    args = engine_args(cfg, model_path, speculate, **overrides)
    log.info("starting vLLM: %s", {k: v for k, v in args.items() if k != "speculative_config"})
    engine = LLMEngine.from_engine_args(EngineArgs(**args))
    if not speculate:
        return engine, None
    s = cfg.serving
    suffix = s.suffix if s.suffix.enabled else None
    link = ProposerLink(engine, v.num_speculative_tokens, suffix)
    entries = list((drafters or {}).values()) if v.in_process else list(drafter_specs or [])
    if not link.setup(entries, asdict(suffix) if suffix is not None else None, dtype=s.dtype):
        raise RuntimeError("vLLM started without OnlineSpec's proposer (speculative_config not applied?)")
    engine.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {"root": registry_root}})
    return engine, link


def update_drafter(engine, update: UpdateInfo) -> None:
    """One drafter version into the running engine, as any vLLM trainer updates weights:
    ``start_draft_weight_update``, ``update_weights``, ``finish_weight_update`` (the
    ``onlinespec`` backend copies the checked file in place). Raises if vLLM refused it; the
    drafter then keeps the weights it had."""
    engine.collective_rpc("start_draft_weight_update")
    engine.collective_rpc("update_weights", kwargs={"update_info": update.to_dict()})  # a failure ends the session
    engine.collective_rpc("finish_weight_update")
