"""The offline build of cut drafters (onlinespec.drafters.distill) on a tiny target: it trains,
stops, resumes where it stopped, and publishes drafters that load through the users' path."""

import json

import torch

from onlinespec.drafters.cut import CutDrafter
from onlinespec.drafters.distill import head_tokens, main
from onlinespec.models import load_model
from tests.tiny import tiny_llama, tiny_tokenizer


def test_head_tokens_are_the_most_frequent_with_the_special_ones():
    import numpy as np

    tokens = np.array([5, 5, 5, 7, 7, 9, 1, 1, 1, 1])
    assert head_tokens(tokens, 12, 3, always=[0]) == [0, 1, 5]
    assert head_tokens(tokens, 12, 4, always=[0]) == [0, 1, 5, 7]


def test_build_trains_resumes_and_publishes(tmp_path, capsys):
    target = tiny_llama(layers=2, hidden=32, heads=4, seed=3, max_positions=256)
    target.save_pretrained(str(tmp_path / "target"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "target"))
    common = ["--target", str(tmp_path / "target"), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
              "--domains", "docs", "--layers", "1", "--head", "64", "--batch", "2", "--seq", "32", "--lr", "3e-3"]
    main(common + ["--steps", "30"])
    first = json.loads((tmp_path / "out" / "build.json").read_text())
    assert first["steps"] == 30 and first["tokens_seen"] == 30 * 2 * 32
    main(common + ["--steps", "40", "--resume"])
    assert "resumed at step 30" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "build.json").read_text())
    assert meta["steps"] == 40 and meta["heldout_before"] == first["heldout_before"]
    kl = [first["heldout_before"]["drafter-1l"]["kl"], first["heldout"]["drafter-1l"]["kl"],
          meta["heldout"]["drafter-1l"]["kl"]]
    assert kl[2] < kl[1] < kl[0] - 0.1, kl  # it learns, and goes on learning after the resume
    drafter = load_model(str(tmp_path / "out" / "drafter-1l"))
    assert isinstance(drafter, CutDrafter) and len(drafter.config.head_tokens) == 64
    with torch.no_grad():
        assert drafter(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, target.config.vocab_size)


def test_a_feature_drafter_builds_and_goes_on_learning_on_the_targets_own_chat_answers(tmp_path, capsys):
    """``--feature`` trains a feature drafter (first and second draft, the second on its own
    feature) that loads through the users' path; ``--data chat --resume`` continues it on the
    target's own answers to chat prompts, generated once and cached, measured on held-out answers."""
    from onlinespec.drafters.feature import FeatureDrafter

    target = tiny_llama(layers=2, hidden=32, heads=4, seed=3, max_positions=1024)
    target.save_pretrained(str(tmp_path / "target"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "target"))
    common = ["--target", str(tmp_path / "target"), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
              "--domains", "docs", "--layers", "", "--feature", "--head", "64", "--batch", "2", "--seq", "32",
              "--lr", "3e-3", "--meta", "build-feature.json"]
    main(common + ["--steps", "30"])
    first = json.loads((tmp_path / "out" / "build-feature.json").read_text())
    assert first["heldout"]["feature"]["kl"] < first["heldout_before"]["feature"]["kl"] - 0.1, first
    assert "agreement_2" in first["heldout"]["feature"]
    drafter = load_model(str(tmp_path / "out" / "feature"))
    assert isinstance(drafter, FeatureDrafter)
    main(common + ["--steps", "40", "--resume", "--data", "chat", "--chat-prompts", "5", "--chat-tokens", "4"])
    out = capsys.readouterr().out
    assert "resumed at step 30" in out and "chat answers:" in out
    assert list((tmp_path / "work").glob("chat-5-4.npz"))
    chat = json.loads((tmp_path / "out" / "build-feature.json").read_text())
    assert chat["steps"] == 40 and "greedy answers to 5 chat prompts" in chat["data"]
    # measured on the chat answers held out, before and after the resumed training
    assert chat["heldout_before"] != first["heldout_before"]
    assert chat["earlier"]["steps"] == 30 and chat["earlier"]["data"] == first["data"]  # the first phase stays on record
    # --from-published: a machine without the checkpoint continues the published drafter
    main(common + ["--steps", "45", "--from-published", "--data", "chat", "--chat-prompts", "5", "--chat-tokens", "4"])
    assert "step 40 (" in capsys.readouterr().out
    more = json.loads((tmp_path / "out" / "build-feature.json").read_text())
    assert more["steps"] == 45 and more["earlier"]["steps"] == 40 and more["earlier"]["earlier"]["steps"] == 30
    # it starts where the published one stands (a fresh drafter would be far off: see the first phase)
    before, published = more["heldout_before"]["feature"], chat["heldout"]["feature"]
    assert abs(before["kl"] - published["kl"]) < 0.02, (before, published)
