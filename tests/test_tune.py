"""Exporting feedback, importing it back, and ranking learner configurations by replay."""

import copy
import json

import pytest
import torch
import yaml

from onlinespec import keys
from onlinespec.cli import main
from onlinespec.codec import encode
from onlinespec.drafters.hf import HFDrafter
from onlinespec.engine import EngineConfig, SpeculativeEngine
from onlinespec.sampling import SamplingParams
from onlinespec.tune import export_stream, import_stream, read_file
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    target = tiny_llama(layers=2, hidden=48, heads=4, seed=7)
    drafter = copy.deepcopy(target)
    torch.manual_seed(3)
    with torch.no_grad():
        drafter.lm_head.weight.add_(torch.randn_like(drafter.lm_head.weight) * 1.5 * drafter.lm_head.weight.std())
    drafter.save_pretrained(root / "drafter")
    tiny_tokenizer().save_pretrained(root / "drafter")
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=4, feedback_topk=16))
    g = torch.Generator().manual_seed(0)
    records = [engine.generate(torch.randint(1, 16, (6,), generator=g).tolist(),
                               SamplingParams(max_new_tokens=24, temperature=1.0, seed=i, ignore_eos=True)).record
               for i in range(48)]
    return root, records


def test_export_import_round_trip_skips_bad_payloads(logged, redis_client, tmp_path):
    _, records = logged
    for r in records[:10]:
        redis_client.xadd(keys.feedback_stream("a"), {"r": encode(r)})
    redis_client.xadd(keys.feedback_stream("a"), {"r": b"\x81garbage"})
    path = tmp_path / "feedback.msgpack"
    assert export_stream(redis_client, "a", path) == 11
    again, skipped = read_file(path)
    assert len(again) == 10 and skipped == 1
    assert [r.request_id for r in again] == [r.request_id for r in records[:10]]
    assert import_stream(redis_client, "b", path) == 11
    assert redis_client.xlen(keys.feedback_stream("b")) == 11
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"not a feedback file")
    with pytest.raises(ValueError):
        read_file(bad)


def test_tuner_ranks_a_zero_step_size_below_a_reasonable_one(logged, tmp_path, capsys):
    root, records = logged
    path = tmp_path / "feedback.msgpack"
    import msgpack

    with open(path, "wb") as f:
        f.write(msgpack.packb({"format": "onlinespec-feedback", "version": 1, "target": "t"}))
        for r in records:
            f.write(msgpack.packb(encode(r), use_bin_type=True))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"mode": "grid", "space": {
        "optim.lr": [0.0, 0.05], "optim.adaptive": [True], "trainable": ["lm_head"], "round_records": [8]}}))
    out = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as done:
        main(["tune", "run", "--file", str(path), "--space", str(space), "--drafter", str(root / "drafter"),
              "--out", str(out), "--json"])
    assert done.value.code == 0
    ranking = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ranking"]
    assert ranking[0]["settings"]["optim.lr"] == 0.05 and ranking[-1]["settings"]["optim.lr"] == 0.0
    assert ranking[0]["prequential_loss"] < ranking[-1]["prequential_loss"]
    assert ranking[0]["predicted_accepted_length"] > ranking[-1]["predicted_accepted_length"]
    best = yaml.safe_load(out.read_text())
    assert best["optim"]["lr"] == 0.05 and best["trainable"] == "lm_head"


def test_tune_never_overwrites_its_input_and_checks_the_token_first(logged, tmp_path, monkeypatch, capsys):
    """`tune run --out` equal to `--file` once replaced the exported feedback with a YAML file; and
    a missing admin token for --apply was found only after the whole run."""
    path = tmp_path / "feedback.msgpack"
    path.write_bytes(b"exported feedback")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["tune", "run", "--file", str(path), "--out", "feedback.msgpack"])
    assert done.value.code == 2 and path.read_bytes() == b"exported feedback"
    assert "refusing to write" in capsys.readouterr().err
    monkeypatch.delenv("ONLINESPEC_ADMIN_TOKEN", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["tune", "run", "--file", str(path), "--apply", "http://127.0.0.1:9"])
    assert done.value.code == 2 and "admin token" in capsys.readouterr().err
    assert path.read_bytes() == b"exported feedback" and not (tmp_path / "tune-best.yaml").exists()
