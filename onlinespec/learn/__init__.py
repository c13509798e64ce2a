"""Learning: feedback records in, drafter versions out, and everything that governs the versions.

The learners (``losses``, ``optim``, ``learner``, ``hedge``, ``pool``, ``estimate``, ``batch``,
``forward``) and one learning round of a worker (``round``); the versioned checkpoints
(``registry``) and a drafter's state transitions (``control``: pause, resume, pin, rollback);
offline replay of logged traffic (``replay``) and hyperparameter studies (``tune/``).

May import: ``onlinespec.feedback``, ``onlinespec.decode``, ``onlinespec.drafters`` and the shared
top-level modules; not ``ops``, ``serving`` or ``workers``.
"""
