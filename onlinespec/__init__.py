"""OnlineSpec: speculative decoding whose drafters learn online from live traffic.

The folders follow the data flow (docs/architecture.md has the picture):

- ``decode/``: one step of speculative decoding for a batch of requests (propose, verify, accept,
  rewind) and the feedback record each request leaves behind;
- ``feedback/``: that record on the wire (codec) and through Redis (stream, keys);
- ``learn/``: the learners that turn records into drafter versions, the registry that keeps the
  versions, the control plane of a drafter's state, replay and tuning;
- ``drafters/``: the drafter models themselves (cut from the target, any Hugging Face LM, n-gram);
- ``ops/``: running and measuring it all on one machine (``up``, ``traffic``, ``watch``, ``bench``);
- ``vllm_backend/``: ``serving.engine: vllm``: the drafters as vLLM's proposer, vLLM's engine started for a config;
- the two processes live outside the package: ``serving/`` (HTTP server and engine loop) and
  ``workers/`` (RQ learners);
- shared by all: ``config`` (the typed service configuration), ``errors``, ``models`` and
  ``packaged`` (loading targets and drafters), ``device``, ``redis_server``, ``background``,
  ``faults``, ``demo/`` (the bundled corpora and prompts) and ``cli`` (the ``onlinespec`` command).

Who may import whom is checked by tests/test_layout.py: ``feedback`` imports none of the other
folders, ``decode``, ``drafters`` and ``vllm_backend`` not ``learn`` or ``ops``, ``learn`` not ``ops``; nothing in
the package but ``ops`` and ``cli`` imports ``serving`` or ``workers``.
"""

__version__ = "0.1.0"
