"""Prefix caching: the keys and values of text the target has read, reused by later prompts.

Chat traffic repeats its beginnings: the chat template's system prompt (29-55 tokens of
SmolLM2's 52-217-token chat prompts in :mod:`onlinespec.decode.chat`), a deployment's
instructions, a conversation's earlier turns. A :class:`PrefixCache` keeps the keys and values
of what requests read (their prompts, and their whole text when they finish) in a radix tree of
token runs, as SGLang's RadixAttention does: a node holds one run of tokens that follows its
parent's, with that run's keys and values in every layer of the target, and where known the
target's last hidden state at those positions (a feature drafter reads them). A new prompt takes
the longest run of nodes its tokens match, token by token; only the rest is prefilled.

A position's keys and values depend on every token before it and on nothing after, so a node's
tensors are exactly what the target would compute for that prefix: reusing them changes no
output (verification still reads the same keys). Within the token budget the least recently
used leaf goes first: the shared beginnings, touched by every request that matches them, stay.
Each ``scope`` (the batch's: one for all requests, or one per tenant) has a tree of its own; the
budget is shared. Not thread-safe: the batch that owns it drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onlinespec.decode.features import FeatureLog
from onlinespec.decode.slots import SlotCache

__all__ = ["PrefixCache", "PrefixStats"]


@dataclass
class PrefixStats:
    """What the cache did since it started (counters) and holds now."""

    looked_up: int = 0  # prompt tokens that could have been taken from the cache
    hit: int = 0  # of which were
    stored: int = 0  # tokens written into the cache
    evicted: int = 0  # tokens evicted to stay within the budget
    tokens: int = 0  # tokens held now
    nbytes: int = 0  # bytes held now

    def carry(self, earlier: PrefixStats) -> None:
        """Go on counting from an earlier cache's counters (a fresh cache after a crash)."""
        for name in ("looked_up", "hit", "stored", "evicted"):
            setattr(self, name, getattr(self, name) + getattr(earlier, name))


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...] = ()
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)  # by their first token
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [heads, n, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [n, hidden] where a request that read them kept them
    used: int = 0  # the clock at the last match or store

    @property
    def nbytes(self) -> int:
        extra = self.hidden.nbytes if self.hidden is not None else 0
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values) + extra

    def split(self, n: int) -> _Node:
        """Cut this node after its first ``n`` tokens: a new node holds them and becomes this
        node's parent. Returns the new node."""
        head = _Node(self.tokens[:n], self.parent, {self.tokens[n]: self},
                     [k[:, :n].clone() for k in self.keys], [v[:, :n].clone() for v in self.values],
                     None if self.hidden is None else self.hidden[:n].clone(), self.used)
        self.parent.children[self.tokens[0]] = head
        self.tokens, self.parent = self.tokens[n:], head
        self.keys = [k[:, n:].clone() for k in self.keys]
        self.values = [v[:, n:].clone() for v in self.values]
        if self.hidden is not None:
            self.hidden = self.hidden[n:].clone()
        return head


class PrefixCache:
    """Keys and values of up to ``max_tokens`` positions of text read before, by prefix."""

    def __init__(self, max_tokens: int):
        assert max_tokens >= 1, "a prefix cache holds at least one token (0: none at all)"
        self.max_tokens = max_tokens
        self.roots: dict[object, _Node] = {}  # a tree per scope
        self.clock = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return self.stats.tokens

    def _match(self, tokens: list[int], hidden: bool, scope: object) -> list[tuple[_Node, int]]:
        """The nodes ``tokens`` follow from ``scope``'s root, each with how many of its tokens
        match (all but possibly the last). ``hidden``: stop at a node without hidden states."""
        path, node, at = [], self.roots.get(scope), 0
        if node is None:
            return path
        while at < len(tokens):
            child = node.children.get(tokens[at])
            if child is None or (hidden and child.hidden is None):
                break
            n = 0
            for mine, theirs in zip(child.tokens, tokens[at:]):
                if mine != theirs:
                    break
                n += 1
            path.append((child, n))
            at += n
            if n < len(child.tokens):
                break
            node = child
        return path

    @torch.inference_mode()
    def load(self, tokens: list[int], cache: SlotCache, row: int, features: FeatureLog | None = None,
             scope: object = None) -> int:
        """Write the longest prefix of ``tokens`` cached in ``scope`` into ``row`` of ``cache`` (a
        fresh row: its length becomes the prefix's) and, with ``features``, append its hidden
        states there (only prefixes whose hidden states are known are taken then). Returns its
        length."""
        self.stats.looked_up += len(tokens)
        path = self._match(tokens, hidden=features is not None, scope=scope)
        length = sum(n for _, n in path)
        if not length:
            return 0
        self.clock += 1
        keys, values = [], []
        for node, _ in path:
            node.used = self.clock
        for layer in range(len(path[0][0].keys)):
            keys.append(torch.cat([node.keys[layer][:, :n] for node, n in path], dim=1))
            values.append(torch.cat([node.values[layer][:, :n] for node, n in path], dim=1))
        cache.fill(row, keys, values)
        if features is not None:
            features.append(torch.cat([node.hidden[:n] for node, n in path]))
        self.stats.hit += length
        return length

    @torch.inference_mode()
    def store(self, tokens: list[int], cache: SlotCache, row: int, features: FeatureLog | None = None,
              scope: object = None) -> int:
        """Keep in ``scope`` what ``row`` of ``cache`` holds for ``tokens`` (its first
        ``len(tokens)`` positions; with ``features``, their hidden states too, also for a cached
        prefix that had none), then evict to the budget. Returns the tokens newly stored."""
        # a text longer than the whole budget keeps its beginning (whatever else is evicted)
        n_tokens = min(len(tokens), int(cache.lengths[row]), self.max_tokens)
        if n_tokens <= 0:
            return 0
        if features is not None and len(features) < n_tokens:
            features = None  # hidden states are kept whole or not at all
        self.clock += 1
        node, at = self.roots.setdefault(scope, _Node()), 0
        for child, n in self._match(tokens[:n_tokens], hidden=False, scope=scope):
            if n < len(child.tokens):
                child = child.split(n)
            if features is not None and child.hidden is None:
                child.hidden = features[at: at + n].clone()
                self.stats.nbytes += child.hidden.nbytes
            child.used = self.clock
            node, at = child, at + n
        new = n_tokens - at
        if new > 0:
            keys, values = cache.read(row, at, n_tokens)
            leaf = _Node(tuple(tokens[at:n_tokens]), node, {}, keys, values,
                         None if features is None else features[at:n_tokens].clone(), self.clock)
            node.children[leaf.tokens[0]] = leaf
            self.stats.stored += new
            self.stats.tokens += new
            self.stats.nbytes += leaf.nbytes
        self.shrink(self.max_tokens)
        return max(new, 0)

    def _leaves(self) -> list[_Node]:
        out, todo = [], [child for root in self.roots.values() for child in root.children.values()]
        while todo:
            node = todo.pop()
            if node.children:
                todo.extend(node.children.values())
            else:
                out.append(node)
        return out

    def shrink(self, tokens: int) -> None:
        """Evict the least recently used leaves until at most ``tokens`` positions are held (the
        batch's requests need the room: ``serving.kv_cache_tokens`` counts both)."""
        while self.stats.tokens > max(tokens, 0):
            leaf = min(self._leaves(), key=lambda node: node.used)
            del leaf.parent.children[leaf.tokens[0]]
            self.stats.tokens -= len(leaf.tokens)
            self.stats.evicted += len(leaf.tokens)
            self.stats.nbytes -= leaf.nbytes
            if leaf.parent.parent is None and not leaf.parent.children:  # a scope left empty
                self.roots = {scope: root for scope, root in self.roots.items() if root.children}
