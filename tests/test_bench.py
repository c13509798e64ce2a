"""The benchmark commands run end to end and end with one JSON object holding the named keys."""

import json
import statistics

import pytest

from onlinespec.cli import main
from tests.tiny import perturbed, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-models")
    target = tiny_llama(layers=2, hidden=64, seed=0)
    tok = tiny_tokenizer()
    for name, model in (("target", target), ("drafter", perturbed(target, 0.05, seed=1))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_engine_json(model_dirs, capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "engine", "--quick", "--json", "--prompts", "2", "--max-new-tokens", "12", "--threads", "1",
              "--target", str(model_dirs / "target"), "--drafter", str(model_dirs / "drafter")])
    out = last_json(capsys)
    assert done.value.code == 0 and out["lossless"] is True and out["suffix_lossless"] is True
    for key in ("target_tokens_per_s", "engine_tokens_per_s", "hf_assisted_tokens_per_s", "mean_accepted_length",
                "speedup", "theoretical_speedup", "efficiency", "ratio_vs_hf", "acceptance_rate", "cost_ratio",
                "suffix_tokens_per_s", "suffix_speedup", "suffix_mean_accepted_length", "suffix_copied_share"):
        assert isinstance(out[key], float) and out[key] >= 0, key


def service_config(tmp_path, model_dirs, drafter_id: str = "d"):
    """A service YAML of the tiny target and its drafter."""
    config = tmp_path / "service.yaml"
    config.write_text(f"target: {{id: tiny, model: {model_dirs / 'target'}}}\n"
                      f"drafters: [{{id: {drafter_id}, model: {model_dirs / 'drafter'}}}]\n")
    return config


def test_bench_engine_on_a_service_config(model_dirs, capsys, tmp_path):
    """With a config: chat prompts, every drafter apart, suffix alone, both, and what the service
    runs on its own (adaptive k), each against the target alone, all lossless; the bound uses the
    measured verification cost."""
    config = service_config(tmp_path, model_dirs, "close")
    with pytest.raises(SystemExit) as done:
        main(["bench", "engine", "--quick", "--json", "--config", str(config), "--prompts", "2",
              "--max-new-tokens", "12", "--threads", "1"])
    out = last_json(capsys)
    assert done.value.code == 0 and out["service_lossless"] is True and out["close_lossless"] is True
    for key in ("speedup", "suffix_speedup", "hf_prompt_lookup_speedup", "close_engine_speedup", "close_both_speedup",
                "close_hf_assisted_speedup", "efficiency", "ratio_vs_hf", "close_verify_cost_ratio"):
        assert isinstance(out[key], float) and out[key] > 0, key
    a, k, c, v = (out[f"close_{x}"] for x in ("acceptance_rate", "k", "cost_ratio", "verify_cost_ratio"))
    assert out["close_acceptance_rate"] > 0.3  # a close drafter: its drafts are accepted
    bound = (1 - a ** (k + 1)) / ((1 - a) * (k * c + v))
    assert out["close_theoretical_speedup"] == pytest.approx(bound)
    # predicted outputs: the quoted text, and the answer itself (every draft from it is right)
    assert out["prediction_lossless"] is True and out["regenerate_lossless"] is True
    assert out["regenerate_mean_accepted_length"] >= 2, out["regenerate_mean_accepted_length"]


def test_bench_loop_json(model_dirs, capsys, redis_url):
    with pytest.raises(SystemExit) as done:
        main(["bench", "loop", "--quick", "--json", "--prompts", "2", "--max-new-tokens", "12", "--threads", "1",
              "--redis-url", redis_url, "--target", str(model_dirs / "target"),
              "--drafter", str(model_dirs / "drafter")])
    out = last_json(capsys)
    assert done.value.code == 0
    assert 0 <= out["logging_overhead"] < 1 and out["worker_rate_ratio"] > 0 and out["writer_dropped"] == 0
    assert "swap_stall_ms" in out


def test_bench_adapt_json_and_plot(model_dirs, capsys, tmp_path):
    plot = tmp_path / "adapt.png"
    with pytest.raises(SystemExit) as done:
        main(["bench", "adapt", "--quick", "--json", "--threads", "1", "--target", str(model_dirs / "target"),
              "--drafters", str(model_dirs / "drafter"), str(model_dirs / "target"),
              "--schedule", "python,docs", "--rounds-per-phase", "2", "--per-round", "2", "--max-new-tokens", "12",
              "--plot", str(plot)])
    out = last_json(capsys)
    assert done.value.code == 0
    assert set(out["methods"]) == {"static", "osd", "ogd", "optimistic", "ensemble", "pool", "optimistic-tv",
                                   "optimistic-acclen", "lookup", "suffix", "pool+suffix"}
    assert out["best_online_method"] not in ("static", "lookup")  # those learn nothing
    for m in out["methods"].values():
        assert len(m["per_round_mean_accepted_length"]) == 4 and m["mean_accepted_length"] >= 1
        assert m["regret_vs_best_fixed"] >= -1e-9
    assert out["ratio_vs_static"] > 0 and out["ratio_vs_osd"] > 0
    assert plot.stat().st_size > 5_000


def test_bench_adapt_methods_take_a_learner_config_under_what_makes_them(tmp_path):
    """``bench adapt --learner-config FILE``: every learning method starts from the file's settings
    and keeps what makes it that method; without a file, the methods are the shared optimizer's."""
    from onlinespec.learn.learner import LearnerConfig
    from onlinespec.ops.bench.adapt import BASE_OPTIM, STEPS_PER_ROUND, _configs

    plain = _configs()
    assert plain["static"] is None
    assert plain["ogd"] == LearnerConfig(optim=BASE_OPTIM, steps_per_round=STEPS_PER_ROUND)
    assert plain["osd"].loss.positions == "rejected" and plain["optimistic"].optim.hint == "last"
    path = tmp_path / "learner.yaml"
    path.write_text("feature_depth: 3\nsteps_per_round: 2\noptim: {lr: 0.001}\n")
    based = _configs(lr=0.003, base=LearnerConfig.from_yaml(path))
    for name, config in based.items():
        if config is None:
            continue
        assert (config.feature_depth, config.steps_per_round, config.optim.lr) == (3, 2, 0.003), name
        mine = plain[name]
        assert (config.loss.positions, config.optim.hint, config.ensemble_size, config.learn_from) == (
            mine.loss.positions, mine.optim.hint, mine.ensemble_size, mine.learn_from), name


def test_bench_serve_json(model_dirs, capsys, tmp_path):
    config = service_config(tmp_path, model_dirs)
    with pytest.raises(SystemExit) as done:
        main(["bench", "serve", "--quick", "--json", "--config", str(config), "--max-new-tokens", "8",
              "--threads", "1"])
    out = last_json(capsys)
    assert done.value.code == 0 and out["lossless"] is True and out["device"] == "cpu"
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 4, 8]
    for level in out["levels"]:
        for key in ("spec_tok_s", "nospec_tok_s", "hf_batched_tok_s", "p50_ms", "p99_ms"):
            assert isinstance(level[key], float) and level[key] > 0, key
        assert level["requests"] >= 2 * level["concurrency"]
        # each repeat's spec and no-spec passes paired: one ratio per repeat, their median reported
        assert len(level["spec_vs_nospec_runs"]) == level["repeats"]
        assert level["spec_vs_nospec_paired"] == statistics.median(level["spec_vs_nospec_runs"]) > 0
        # where each way's time went: phases within the wall time, plain decoding never speculates
        for mode, profile in level["profile"].items():
            assert 0 < sum(profile["share"].values()) <= 1.0 and profile["share"]["verify"] > 0, mode
            assert profile["plain_ms_per_token"] or profile["spec_ms_per_token"], mode
        assert level["profile"]["nospec"]["spec_ms_per_token"] is None
        assert level["profile"]["nospec"]["share"]["draft"] < 0.05


def test_bench_prefix_json(model_dirs, capsys, tmp_path):
    config = service_config(tmp_path, model_dirs)
    with pytest.raises(SystemExit) as done:
        main(["bench", "prefix", "--quick", "--json", "--config", str(config), "--max-new-tokens", "6",
              "--threads", "1", "--concurrency", "2"])
    out = last_json(capsys)
    assert done.value.code == 0 and out["lossless"] is True
    first, second = out["turns"]
    for turn in out["turns"]:
        assert turn["none"]["cached_share"] == 0 and turn["cache"]["tok_s"] > 0 and turn["none"]["ttft_p50_ms"] > 0
        # what the cache gave is what was not prefilled
        saved = turn["none"]["prefilled_tokens"] - turn["cache"]["prefilled_tokens"]
        assert saved == round(turn["cache"]["cached_share"] * turn["prompts"] * turn["mean_prompt_tokens"])
    # a second turn begins with its whole first turn: most of it comes from the cache
    assert second["cache"]["cached_share"] > 0.5 > first["cache"]["cached_share"]


def test_bench_live_prompts_and_quarters():
    """The live benchmark's domain (IDLE's change log, used nowhere else) and its per-quarter
    figures: own drafts and copies apart, tokens/s over each quarter's wall time."""
    from onlinespec.ops.bench.live import changelog_prompts, summarize

    prompts = changelog_prompts()
    assert len(prompts) > 50 and all(p.endswith("\n\n") and len(p) > 100 for p in prompts)
    spec = lambda own, steps, copied, v, drafted: {"drafter_id": "d", "drafter_version": v,  # noqa: E731
                                                   "own": {"accepted_tokens": own, "draft_steps": steps,
                                                           "drafted_tokens": drafted,
                                                           "judged_tokens": min(drafted, own + steps)},
                                                   "copied": {"accepted_tokens": copied}}
    results = [{"done": 1.0, "tokens": 10, "spec": spec(2, 4, 1, 1, 8)},
               {"done": 3.5, "tokens": 10, "spec": spec(0, 0, 0, 2, 0)},
               {"done": 7.9, "tokens": 20, "spec": spec(9, 3, 2, 3, 10)},
               {"done": 8.0, "tokens": 20, "spec": spec(3, 3, 0, 4, 14)}]
    q = summarize(results, 0.0, 8.0)
    assert [x["requests"] for x in q] == [1, 1, 0, 2]
    assert q[0]["own_accepted_length"] == 1.5 and q[0]["own_draft_share"] == 0.2 and q[0]["copied_share"] == 0.1
    # what the accepted length is made of: acceptance per drafted position, drafts per own step
    assert q[0]["own_acceptance"] == 0.25 and q[0]["own_draft_length"] == 2.0
    assert q[3]["own_acceptance"] == 0.5 and q[3]["own_draft_length"] == 4.0
    # per position judged: drafts past a rejection do not dilute it
    assert q[0]["own_position_acceptance"] == 2 / 6 and q[3]["own_position_acceptance"] == 12 / 16
    assert q[1]["own_position_acceptance"] is None
    assert q[1]["own_accepted_length"] is None and q[1]["own_acceptance"] is None and q[2]["tokens_per_s"] == 0.0
    assert q[3]["own_accepted_length"] == 3.0 and q[3]["tokens_per_s"] == 20.0 and q[3]["versions"] == {"d": "v3-v4"}


def test_bench_live_compares_speculation_off_on_the_last_quarters_prompts():
    """The speculation-off server is given the prompts of the requests that finished in the last
    quarter, in the order they were sent (not where the last quarter began, which a slower or
    faster server would leave at other prompts), and each quarter reports its prompts' length."""
    from onlinespec.ops.bench.live import last_quarter_prompts, summarize

    spec = {"own": {"accepted_tokens": 0, "draft_steps": 0, "drafted_tokens": 0}, "copied": {"accepted_tokens": 0}}
    results = [{"i": 0, "prompt": 5, "done": 1.0, "tokens": 8, "prompt_tokens": 100, "spec": spec},
               {"i": 3, "prompt": 1, "done": 7.0, "tokens": 8, "prompt_tokens": 40, "spec": spec},
               {"i": 2, "prompt": 0, "done": 7.5, "tokens": 8, "prompt_tokens": 60, "spec": spec},
               {"i": 1, "prompt": 9, "done": 5.0, "tokens": 8, "prompt_tokens": 300, "spec": spec},
               {"i": 4, "prompt": 2, "done": 9.0, "tokens": 8, "prompt_tokens": 10, "spec": spec}]  # after the run
    assert last_quarter_prompts(results, 0.0, 8.0) == [0, 1]
    q = summarize(results, 0.0, 8.0)
    assert [x["prompt_tokens"] for x in q] == [100, None, 300, 50]


def test_bench_live_compares_with_speculation_off_in_turns():
    """The closing comparison alternates spec, off, off, spec (a steady drift favours neither), and
    sums each side's tokens over its own turns' time: here off is faster in every turn, and a
    mean taken over both sides' turns, or one side's turns counted for the other, would not give
    these figures."""
    from onlinespec.ops.bench.live import paired_summary, turns

    assert turns(4) == ["spec", "off", "off", "spec"]
    assert turns(6) == ["spec", "off", "off", "spec", "spec", "off"]
    for bad in (0, 1, 3):
        with pytest.raises(ValueError, match="even number"):
            turns(bad)
    spec = {"own": {"accepted_tokens": 0, "draft_steps": 0, "drafted_tokens": 0}, "copied": {"accepted_tokens": 0}}
    row = lambda done, tokens, prompt: {"done": done, "tokens": tokens, "prompt_tokens": prompt, "spec": spec}  # noqa: E731
    slices = [("spec", [row(1.0, 30, 100), row(9.0, 99, 100)], 0.0, 2.0),  # the second finished after the turn
              ("off", [row(3.0, 40, 100), row(4.0, 40, 200)], 2.0, 4.0),
              ("off", [row(5.0, 60, 300)], 4.0, 6.0),
              ("spec", [row(7.0, 50, 100)], 6.0, 8.0)]
    out = paired_summary(slices)
    assert out["spec_tokens_per_s"] == 20.0 and out["off_tokens_per_s"] == 35.0
    assert out["spec_vs_off"] == pytest.approx(20 / 35)
    assert out["off_prompt_tokens"] == 200 and out["spec_prompt_tokens"] == 100
    assert [(t["side"], t["tokens_per_s"]) for t in out["slices"]] == [("spec", 15.0), ("off", 40.0), ("off", 30.0),
                                                                       ("spec", 25.0)]


def test_bench_live_plot(tmp_path):
    """The plot draws the quarters, speculation off, and the learned versions' paired figure
    (or none: an older JSON without it)."""
    from onlinespec.ops.bench.live import plot

    quarters = [{"own_accepted_length": a, "tokens_per_s": t} for a, t in ((1.5, 40.0), (None, 43.0), (1.9, 46.0))]
    probe = {"before": {"own_accepted_length": 1.3}, "after": {"own_accepted_length": None}}
    for learned in (50.0, None):
        path = tmp_path / f"live-{learned}.png"
        plot(str(path), quarters, 35.0, learned, probe if learned else None)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_live_learned_acceptance_by_quarter():
    """What the learners measured of each drafter without drafting, per quarter: the rounds that
    ran in it, weighted by their positions; rounds outside the run and rounds without a score
    are not counted, and a drafter without a round in a quarter is left out of it."""
    from onlinespec.ops.bench.live import learned_acceptance

    rounds = {"a": [{"time": 0.5, "mean_alpha": 0.2, "positions": 100},
                    {"time": 1.5, "mean_alpha": 0.5, "positions": 300},  # quarter 1 of [0, 8]: (20 + 150) / 400
                    {"time": -1.0, "mean_alpha": 0.9, "positions": 1000},  # before the run
                    {"time": 5.0, "mean_alpha": None, "positions": 50},  # no score
                    {"time": 8.0, "mean_alpha": 0.6, "positions": 10}],  # the run's end: the last quarter
              "b": [{"time": 7.0, "mean_alpha": 0.3, "positions": 20}, {"time": 9.0, "mean_alpha": 0.9, "positions": 20}]}
    q = learned_acceptance(rounds, 0.0, 8.0)
    assert q[0] == {"a": 0.425} and q[1] == {} and q[2] == {}
    assert q[3] == {"a": 0.6, "b": 0.3}
    # a feature drafter's second position, where its rounds score it (others' rounds carry None)
    rounds["a"][0]["mean_alpha_deeper"], rounds["a"][1]["mean_alpha_deeper"] = 0.1, 0.3
    rounds["b"][0]["mean_alpha_deeper"] = None
    deeper = learned_acceptance(rounds, 0.0, 8.0, key="mean_alpha_deeper")
    assert deeper[0] == {"a": pytest.approx(0.25)} and deeper[3] == {}


def test_bench_live_reports_how_learning_kept_up():
    """Per quarter and drafter: the rounds that ended in it, the share of the quarter they ran
    for, the tokens they learned per second, and how long their oldest records waited."""
    from onlinespec.ops.bench.live import learning_pace

    rounds = {"a": [{"time": 0.5, "seconds": 1.0, "generated_tokens": 40, "lag_seconds": 3.0},
                    {"time": 1.5, "seconds": 0.5, "generated_tokens": 20, "lag_seconds": 5.0},
                    {"time": -2.0, "seconds": 9.0, "generated_tokens": 999, "lag_seconds": 1.0},  # before the run
                    {"time": 7.0, "seconds": 2.0, "generated_tokens": 10}],  # a round from before lag was kept
              "b": []}
    q = learning_pace(rounds, 0.0, 8.0)
    assert q[0] == {"a": {"rounds": 2, "busy": 0.75, "tokens_per_s": 30.0, "lag_s": 4.0, "max_lag_s": 5.0}}
    assert q[1] == {} and q[2] == {}
    assert q[3] == {"a": {"rounds": 1, "busy": 1.0, "tokens_per_s": 5.0, "lag_s": None, "max_lag_s": None}}


def test_bench_live_sends_the_domain_in_a_fixed_shuffled_order():
    """Every quarter of a live run is a sample of the whole change log (its stretches are alike
    within and differ between: in file order the quarters drifted with no learning), the same
    order in every run; ``file`` keeps the order the figures before stop 49 were measured in."""
    from onlinespec.ops.bench.live import changelog_prompts, stream_order

    n = len(changelog_prompts())
    order = stream_order(n)
    assert sorted(order) == list(range(n)) and order == stream_order(n) and order != list(range(n))
    assert stream_order(n, "file") == list(range(n))
    # each quarter of the first pass reaches across the file, not one stretch of it
    for q in range(4):
        part = order[q * n // 4:(q + 1) * n // 4]
        assert min(part) < n // 4 and max(part) >= 3 * n // 4
    with pytest.raises(ValueError):
        stream_order(n, "sorted")


def test_bench_live_holds_a_probe_out_of_the_stream_and_forgets_what_it_served_first(redis_client):
    """The probe's prompts are never in the learning stream, and the feedback of the first
    versions' pass over them is deleted before a learner reads anything: the last versions are
    judged on prompts no learner saw."""
    import uuid
    from types import SimpleNamespace

    from onlinespec.feedback import keys
    from onlinespec.ops.bench.live import PROBE_PROMPTS, _forget_feedback, probe_gain, split_probe, stream_order

    order = stream_order(190)
    stream, probe = split_probe(order, PROBE_PROMPTS)
    assert len(probe) == PROBE_PROMPTS and not set(stream) & set(probe) and sorted(stream + probe) == list(range(190))
    assert split_probe(order, PROBE_PROMPTS) == (stream, probe) and split_probe(order, 0) == (order, [])
    for bad in (-1, 190):
        with pytest.raises(ValueError):
            split_probe(order, bad)
    target = f"probe-{uuid.uuid4().hex[:8]}"
    name = keys.feedback_stream(target)
    service = SimpleNamespace(cfg=SimpleNamespace(target_id=target), redis=redis_client)
    try:
        for i in range(3):
            redis_client.xadd(name, {"r": i})
        assert _forget_feedback(service, sent=3) == 3 and redis_client.xlen(name) == 0
        redis_client.xadd(name, {"r": 9})  # a record short of those sent: waits out the timeout, then deletes
        assert _forget_feedback(service, sent=2, timeout=0.2) == 1 and redis_client.xlen(name) == 0
    finally:
        redis_client.delete(name)
    gain = probe_gain({"own_accepted_length": 1.5, "own_position_acceptance": 0.4, "own_draft_share": 0.0,
                       "tokens_per_s": 30.0},
                      {"own_accepted_length": 1.8, "own_position_acceptance": 0.5, "own_draft_share": 0.1,
                       "tokens_per_s": 33.0})
    assert gain.pop("own_draft_share") is None  # none before: no ratio
    assert gain == pytest.approx({"own_accepted_length": 1.2, "own_position_acceptance": 1.25, "tokens_per_s": 1.1})
