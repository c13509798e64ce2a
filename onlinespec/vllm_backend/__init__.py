"""vLLM as the serving engine (``serving.engine: vllm``): OnlineSpec's drafters propose inside vLLM.

By default vLLM runs in the server process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
:mod:`serving.vllm_loop` steps its ``LLMEngine`` from the engine-loop thread), so the proposer vLLM
builds (:class:`~onlinespec.vllm_backend.proposer.OnlineSpecProposer`, ``method: custom_class``)
drafts with the server's own :class:`~onlinespec.drafters.hf.HFDrafter` objects. The server reaches
it only by name, with plain data (:mod:`.worker`, vLLM's worker extension; :mod:`.link`, the
server's side), so with vLLM's engine in its own process or tensor-parallel workers each proposer
builds its drafters from the registry's files instead. New versions reach them through vLLM's
weight-update API and the ``onlinespec`` transfer backend (:mod:`.transfer`, a vLLM plugin). The
proposer keeps per request what it drafted and what vLLM accepted, which the loop joins with
vLLM's log-probs into the feedback record the learners already read.

Nothing here is imported by the embedded engine; this package needs ``vllm`` (its own
virtualenv: ``./run vllm-setup``). It may import ``decode`` (the slot cache), ``drafters`` and the
shared modules; not ``learn``, ``ops``, ``serving`` or ``workers`` (it runs inside vLLM's engine).
"""
