"""A drafter cut from its target: the target's first layers, its frozen embedding, a reduced head.

For a target whose vocabulary is large next to its layers (SmolLM2-135M: 49152 x 576), a small
drafter spends most of a step in the output head. A :class:`CutDrafter` keeps

- ``N`` decoder layers and a final norm of its own (initialised from the target's first ``N``
  layers and its norm; these are what learns, and all a published version stores);
- the target's input embedding, shared in memory and frozen (:func:`target_embedding`);
- a head over the ``V`` tokens the target writes most often (their rows of the target's output
  head, frozen, plus a learnt bias per token), as FR-Spec does. Every other token gets one
  learnt logit, ``rest``: the drafter's ``q`` is a distribution over the whole vocabulary, so its
  KL to the target stays finite and sampled verification stays exact. Verification is over the
  full vocabulary: the head changes what is proposed, never the output.

It is a ``LlamaForCausalLM`` (``model_type`` ``onlinespec-cut``, registered with transformers'
Auto classes when this module is imported): the engine's batched drafting, the learners'
teacher forcing and the registry's ``from_config`` treat it like any Hugging Face drafter, and
its logits are full-vocabulary logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from onlinespec.errors import ModelLoadError
from onlinespec.cpu_linear import project
from onlinespec.drafters.logits import ReducedLogits

__all__ = ["CutConfig", "CutDrafter", "ReducedHead", "SharedEmbedding", "target_embedding", "share_embedding",
           "cut_from", "load_cut", "is_cut", "on_target"]

MODEL_TYPE = "onlinespec-cut"
_SHARED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # resolved target path -> (embedding, head)


def _key(target: str) -> str:
    from onlinespec.models import resolve_model_path

    path = resolve_model_path(target)
    return str(Path(path).resolve()) if Path(path).exists() else path


def share_embedding(target: str, model) -> None:
    """Make a loaded target's embedding and head the ones its cut drafters use (no second copy)."""
    head = model.get_output_embeddings()
    _SHARED[_key(target)] = (model.get_input_embeddings().weight.detach(), head.weight.detach())


def target_embedding(target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's (input embedding, output head) weights, each [vocab, hidden] (one tensor when
    tied): the loaded target's own when the process has one (:func:`share_embedding`), else
    read alone from its safetensors (not the whole model)."""
    key = _key(target)
    if key in _SHARED:
        return _SHARED[key]
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(key).glob("*.safetensors")) if Path(key).is_dir() else []:
        with safe_open(str(file), framework="pt") as f:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in f.keys():
                    found[name] = f.get_tensor(name).float()
    if "model.embed_tokens.weight" not in found:
        raise ModelLoadError(f"a cut drafter needs its target's embedding, and {target!r} ({key}) has no "
                             "safetensors file holding model.embed_tokens.weight")
    embedding = found["model.embed_tokens.weight"]
    _SHARED[key] = (embedding, found.get("lm_head.weight", embedding))  # no lm_head stored: tied
    return _SHARED[key]


class CutConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def __init__(self, target: str | None = None, head_tokens: list[int] | None = None, **kwargs):
        kwargs["tie_word_embeddings"] = False  # the head is its own module, never tied by transformers
        super().__init__(**kwargs)
        self.target = target
        self.head_tokens = [int(t) for t in (head_tokens or [])]


class SharedEmbedding(nn.Module):
    """The target's embedding, used as is: a buffer left out of the state dict."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class ReducedHead(nn.Module):
    """Full-vocabulary logits from a head over ``ids`` only: the rest share one learnt logit."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor, vocab: int, rest: float = -10.0):
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)  # [V, H]: the target's, frozen
        self.register_buffer("ids", ids, persistent=False)  # [V] int64: their vocabulary ids
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(len(ids)))
        self.rest = nn.Parameter(torch.tensor(float(rest)))
        column = torch.full((vocab,), len(ids), dtype=torch.long)
        column[ids] = torch.arange(len(ids))
        self.register_buffer("column", column, persistent=False)  # [vocab]: each id's column, len(ids) if none
        outside = (column == len(ids)).nonzero()
        self.first_rest = int(outside[0]) if len(outside) else vocab

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compact(hidden).dense()  # [..., vocab]

    def compact(self, hidden: torch.Tensor) -> ReducedLogits:
        """The logits of ``hidden`` [..., H] without their full-vocabulary expansion (what the
        learners read, from [N, H]: :mod:`onlinespec.drafters.logits`)."""
        return ReducedLogits(project(hidden, self.rows, self.bias), self.rest, self.ids, self.column,
                             self.first_rest)


def on_target(model: LlamaForCausalLM, config, kind: str) -> None:
    """Build ``model`` (a Llama causal LM subclass) around its target's shared tensors: the
    target's embedding (frozen, shared in memory) and a reduced head over ``config.head_tokens``;
    Llama's own full-width embedding and head are never allocated. ``kind`` names the drafter
    in errors."""
    vocab = config.vocab_size
    pad = config.pad_token_id
    config.vocab_size, config.pad_token_id = 1, None  # Llama's full-width embedding and head go unused
    try:
        LlamaForCausalLM.__init__(model, config)
    finally:
        config.vocab_size, config.pad_token_id = vocab, pad
    if not config.target or not config.head_tokens:
        raise ModelLoadError(f"a {kind} drafter's config names its target and its head tokens")
    embedding, head = target_embedding(config.target)
    if tuple(embedding.shape) != (vocab, config.hidden_size) or head.shape != embedding.shape:
        raise ModelLoadError(f"target {config.target!r} has an embedding of shape {tuple(embedding.shape)}; "
                             f"this drafter expects ({vocab}, {config.hidden_size})")
    ids = torch.tensor(config.head_tokens, dtype=torch.long)
    model.model.embed_tokens = SharedEmbedding(embedding)
    model.lm_head = ReducedHead(head.index_select(0, ids), ids, vocab)


class CutDrafter(LlamaForCausalLM):
    config_class = CutConfig
    _tied_weights_keys = {}

    def __init__(self, config: CutConfig):
        on_target(self, config, "cut")

    def get_output_embeddings(self):
        return None  # not a Linear: nothing to tie or resize

    def _init_weights(self, module):
        if isinstance(module, (SharedEmbedding, ReducedHead)):
            return
        super()._init_weights(module)


AutoConfig.register(MODEL_TYPE, CutConfig, exist_ok=True)
AutoModelForCausalLM.register(CutConfig, CutDrafter, exist_ok=True)


def is_cut(path: str) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_cut(path: str) -> CutDrafter:
    """A saved cut drafter: its config, its target's shared tensors, its own weights (strict)."""
    from safetensors.torch import load_file

    config = CutConfig.from_pretrained(path)
    model = CutDrafter(config)
    weights = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.eval()


def cut_from(target, target_name: str, layers: int, head_tokens: list[int]) -> CutDrafter:
    """A drafter of the target's first ``layers`` layers and final norm, untrained otherwise
    (``rest`` starts low: little mass outside the head)."""
    config = target.config.to_dict()
    for k in ("model_type", "architectures", "quantization_config", "tie_word_embeddings", "transformers_version",
              "_model_name_or_path", "dtype", "torch_dtype"):
        config.pop(k, None)
    config["num_hidden_layers"] = layers
    share_embedding(target_name, target)
    drafter = CutDrafter(CutConfig(target=target_name, head_tokens=head_tokens, **config))
    inner = target.model
    with torch.no_grad():
        for mine, theirs in zip(drafter.model.layers, inner.layers[:layers]):
            mine.load_state_dict(theirs.state_dict())
        drafter.model.norm.load_state_dict(inner.norm.state_dict())
    return drafter.eval()
