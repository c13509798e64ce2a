"""A feature-level drafter (EAGLE-style): it drafts from the target's own hidden states.

Verification already computes the target's last hidden state ``h_i`` at every position it reads
(the vector its head turns into ``p``). A :class:`FeatureDrafter` reads, at position ``i``, the
pair ``(h_i, x_{i+1})``: the target's feature after token ``i`` and the embedding of the token
that followed. Through ``fc`` (``2H -> H``), one decoder layer of its own and a final norm it
outputs ``g_i``, its guess of ``h_{i+1}``; its head scores ``g_i`` for ``x_{i+2}``. So it knows
what the target knew one token ago, and only has to take the target one token further, which a
single layer does far better than a small model reading tokens alone (EAGLE, Li et al. 2024).

Drafting a block after the settled ``x_0 .. x_n``: the pairs ``0 .. n-1`` hold true features (the
target read those tokens), the output at pair ``n-1`` gives the first draft ``d_1``; the pair
``(g_{n-1}, d_1)`` gives ``d_2``, and so on: past the settled text the drafter feeds on its own
features, which is why it is trained on them too (:func:`unrolled_logits`, EAGLE-3's
training-time test). After verification, the pairs with its own features are forgotten and the
target's true features of the accepted tokens take their place.

Like :class:`~onlinespec.drafters.cut.CutDrafter`, it shares the target's embedding (frozen, in
memory) and scores a head over the ``V`` most frequent tokens (the target's rows, frozen, a learnt
bias each, one learnt logit for the rest), so ``q`` covers the whole vocabulary and sampled
verification stays exact. What learns, and all a version stores: ``fc``, the layer, the norm,
the head's biases. Its ``model_type`` is ``onlinespec-feature`` (registered with transformers'
Auto classes when this module is imported); the engine drafts with it through
:class:`~onlinespec.decode.proposers.FeatureRows`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from onlinespec.drafters.cut import ReducedHead, SharedEmbedding, on_target, share_embedding

__all__ = ["FeatureConfig", "FeatureDrafter", "is_feature", "load_feature", "feature_from", "unrolled_logits",
           "unrolled_features"]

MODEL_TYPE = "onlinespec-feature"


class FeatureConfig(LlamaConfig):
    model_type = MODEL_TYPE

    def __init__(self, target: str | None = None, head_tokens: list[int] | None = None, **kwargs):
        kwargs["tie_word_embeddings"] = False
        kwargs.setdefault("num_hidden_layers", 1)
        super().__init__(**kwargs)
        self.target = target
        self.head_tokens = [int(t) for t in (head_tokens or [])]


class FeatureDrafter(LlamaForCausalLM):
    """``forward(input_ids, features)``: ``features[b, t]`` is the feature paired with token
    ``input_ids[b, t]`` (``h_i`` with ``x_{i+1}``). Returns full-vocabulary logits and, as
    ``hidden_states[-1]``, the output features ``g`` (what the next pair feeds on when the
    target's own feature is not known yet)."""

    config_class = FeatureConfig
    _tied_weights_keys = {}

    def __init__(self, config: FeatureConfig):
        on_target(self, config, "feature")
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        with torch.no_grad():  # start as "the token's embedding, plus the feature": a sane first step
            eye = torch.eye(config.hidden_size)
            self.fc.weight.copy_(torch.cat([eye, eye], dim=1) * 0.5)

    def get_output_embeddings(self):
        return None

    def _init_weights(self, module):
        if isinstance(module, (SharedEmbedding, ReducedHead)) or module is getattr(self, "fc", None):
            return
        super()._init_weights(module)

    def fuse(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input: ``fc([embedding(x), feature])``, ``[B, T, H]``."""
        emb = self.model.embed_tokens(input_ids)
        return self.fc(torch.cat([emb, features.to(emb.dtype)], dim=-1))

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor | None = None, attention_mask=None,
                position_ids=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        if features is None:
            raise ValueError("a feature drafter drafts from the target's features: pass features= "
                             "(the target's last hidden states, one per token)")
        kwargs.pop("inputs_embeds", None)
        kwargs.pop("output_hidden_states", None)
        out = self.model(inputs_embeds=self.fuse(input_ids, features), attention_mask=attention_mask,
                         position_ids=position_ids, **kwargs)
        g = out.last_hidden_state
        keep = g[:, -logits_to_keep:] if logits_to_keep else g
        return CausalLMOutputWithPast(logits=self.lm_head(keep), past_key_values=out.past_key_values,
                                      hidden_states=(g,))


AutoConfig.register(MODEL_TYPE, FeatureConfig, exist_ok=True)
AutoModelForCausalLM.register(FeatureConfig, FeatureDrafter, exist_ok=True)


def is_feature(model_or_path) -> bool:
    """Whether a model (or a saved model's folder) is a feature drafter."""
    if isinstance(model_or_path, nn.Module):
        return isinstance(model_or_path, FeatureDrafter)
    try:
        return json.loads((Path(model_or_path) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_feature(path: str) -> FeatureDrafter:
    """A saved feature drafter: its config, its target's shared tensors, its own weights (strict)."""
    from safetensors.torch import load_file

    model = FeatureDrafter(FeatureConfig.from_pretrained(path))
    weights = load_file(str(Path(path) / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.eval()


def feature_from(target, target_name: str, head_tokens: list[int], layer: int | None = None) -> FeatureDrafter:
    """An untrained feature drafter for ``target``: one decoder layer shaped like the target's,
    initialised from the target's last layer (``layer``, default the last: it maps features
    near the output space), the target's final norm."""
    config = target.config.to_dict()
    for k in ("model_type", "architectures", "quantization_config", "tie_word_embeddings", "transformers_version",
              "_model_name_or_path", "dtype", "torch_dtype", "num_hidden_layers"):
        config.pop(k, None)
    share_embedding(target_name, target)
    drafter = FeatureDrafter(FeatureConfig(target=target_name, head_tokens=head_tokens, **config))
    inner = target.model
    source = inner.layers[layer if layer is not None else len(inner.layers) - 1]
    with torch.no_grad():
        drafter.model.layers[0].load_state_dict(source.state_dict())
        drafter.model.norm.load_state_dict(inner.norm.state_dict())
    return drafter.eval()


def _level_mask(t: int, level: int, device) -> torch.Tensor:
    """What level ``L = level``'s queries see of the keys of levels ``0 .. L`` (``t`` positions
    each; level 0: pairs with the target's features; level ``l``: each pair fed on the drafter's
    own feature, ``l`` drafts deep). A query of level ``L`` at position ``i`` sees what it would
    see when drafting: true pairs ``j <= i - L`` and, for each level ``l = 1 .. L``, the level-``l``
    pair at ``i - L + l``. [t, (L + 1) * t] bool."""
    i = torch.arange(t, device=device)
    row = [i[None, :] <= (i[:, None] - level)]
    row += [i[None, :] == (i[:, None] - level + small) for small in range(1, level + 1)]
    mask = torch.cat(row, dim=1)
    # a query with nothing to see (level L at i < L has no true pairs) still sees itself: its loss
    # is dropped, but a fully masked row would put NaNs in the softmax
    own = torch.zeros_like(mask)
    own[:, level * t:] = torch.eye(t, dtype=torch.bool, device=device)
    return mask | (own & ~mask.any(dim=1, keepdim=True))


def unrolled_logits(drafter: FeatureDrafter, ids: torch.Tensor, features: torch.Tensor, levels: int = 2
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher forcing with the training-time test: per level ``L`` (0 .. levels-1), the drafter's
    (logits, output features) at every pair ``i`` as if drafting ``L + 1`` tokens deep
    (:func:`unrolled_features`, then the head at every pair)."""
    return [(drafter.lm_head(g), g) for g in unrolled_features(drafter, ids, features, levels)]


def unrolled_features(drafter: FeatureDrafter, ids: torch.Tensor, features: torch.Tensor, levels: int = 2
                      ) -> list[torch.Tensor]:
    """Per level ``L`` (0 .. levels-1), the drafter's output features ``[B, T, H]`` at every pair
    ``i`` as if drafting ``L + 1`` tokens deep, the last ``L`` pairs fed on its own features.
    ``ids [B, T]`` are the tokens ``x_1 .. x_T`` and ``features [B, T, H]`` the target's
    ``h_0 .. h_{T-1}``: pair ``i`` is ``(h_i, x_{i+1})``. Level ``L``'s features at pair ``i``
    score ``x_{i+2}`` (through the head), as level 0's do; rows ``i < L`` have no such context and
    are the caller's to drop. One forward of ``t`` pairs per level, its queries attending over the
    keys of the levels before it (kept in a cache, gradients flowing through them); the head is
    the caller's, at the pairs it needs (over the whole vocabulary, it costs more than the layer)."""
    from transformers import DynamicCache

    from onlinespec.decode.lm import CACHE_KWARG

    b, t = ids.shape
    positions = torch.arange(t, device=ids.device)[None].expand(b, -1)
    cache = DynamicCache(config=drafter.config)  # the keys and values of the levels so far
    outs: list[torch.Tensor] = []
    for level in range(levels):
        own = features if level == 0 else torch.cat([features[:, :1], outs[-1][:, :-1]], dim=1)  # pair i fed on g_{i-1}
        mask = _level_mask(t, level, ids.device)[None, None]
        if getattr(drafter.config, "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(mask.shape, dtype=own.dtype, device=ids.device).masked_fill(
                ~mask, torch.finfo(own.dtype).min)
        out = drafter.model(inputs_embeds=drafter.fuse(ids, own), attention_mask=mask.expand(b, 1, -1, -1),
                            position_ids=positions, use_cache=True, **{CACHE_KWARG: cache})
        outs.append(out.last_hidden_state)
    return outs
