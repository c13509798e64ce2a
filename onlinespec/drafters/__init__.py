"""Drafters: the models that propose tokens for the target to verify.

The ``Drafter`` protocol (``base``), drafters cut from the target with a shared embedding and a
reduced head (``cut``) and their offline distillation (``distill``), any Hugging Face causal LM
(``hf``), n-gram prompt lookup (``ngram``).

May import: ``onlinespec.decode`` (sampling, the suffix index), ``onlinespec.demo`` (offline text)
and the shared top-level modules; not ``learn``, ``ops``, ``serving`` or ``workers``.
"""
