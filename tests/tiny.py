"""Tiny random Llama models for fast tests (built in seconds, never downloaded)."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128
EOS = 0


def tiny_llama(layers=2, hidden=64, heads=4, vocab=VOCAB, seed=0, max_positions=512) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        # Untied and a wide init: a random tied model just repeats its input token.
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    """A copy of ``model`` with Gaussian noise on every weight: a drafter that agrees partly."""
    torch.manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * noise * p.std())
    return other.eval()


def tiny_tokenizer(vocab: int = VOCAB):
    """One character per id (id 0 is the EOS token), decoding by plain concatenation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = {"<eos>": 0, " ": 1, "\n": 2}
    for i in range(3, vocab):
        chars[chr(0x21 + i)] = i  # printable and distinct
    tok = Tokenizer(models.WordLevel(chars, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
