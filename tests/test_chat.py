"""Chat prompts from offline text, rendered the server's way; suffix speculation alone measured
against the target alone and prompt lookup (what `bench engine --config` reports)."""

import pytest

from onlinespec.ops.bench.engine import measure_suffix_only
from onlinespec.decode.chat import DOMAINS, chat_prompts, render


def test_chat_prompts_are_deterministic_per_domain():
    for domain in DOMAINS:
        first = chat_prompts(domain, 6)
        assert len(first) == 6 and first == chat_prompts(domain, 6), domain
        assert all(m[0]["role"] == "user" and len(m[0]["content"]) > 40 for m in first)
    assert "```python" in chat_prompts("edit", 1)[0][0]["content"]
    with pytest.raises(ValueError, match="known"):
        chat_prompts("poetry", 1)


def test_suffix_only_measurement_is_lossless_on_tiny_models(target, tokenizer):
    prompts = [render(tokenizer, [{"role": "user", "content": f"abcabc{i} xyzxyz"}]) for i in range(3)]
    out = measure_suffix_only(target, tokenizer, prompts, max_new_tokens=24, k=4)
    assert out["suffix_lossless"] and out["suffix_fixed_k_lossless"] and out["hf_prompt_lookup_lossless"]
    assert out["generated_tokens"] > 0 and out["suffix_tokens_per_s"] > 0 and out["verify_cost_ratio"] > 0
