"""The adaptive draft-length controller and the n-gram drafter, on synthetic inputs."""

import pytest

from onlinespec.decode.adaptive import AdaptiveK, expected_tokens, theoretical_speedup
from onlinespec.drafters.ngram import NGramDrafter
from onlinespec.decode.sampling import SamplingParams


def feed(ctl, accept_rate, drafted, steps, t_draft, t_verify):
    for i in range(steps):
        k = ctl.choose()
        if k == 0:
            ctl.observe_plain(0.010)
            continue
        # deterministic stream with the given per-token acceptance
        accepted = 0
        while accepted < k and ((i * 7919 + accepted * 104729) % 1000) / 1000 < accept_rate:
            accepted += 1
        ctl.observe_spec(k, accepted, t_draft * k, t_verify)


def test_expected_tokens_and_theoretical_speedup():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert theoretical_speedup(0.8, 4, 0.0) == pytest.approx((1 - 0.8**5) / 0.2)
    assert theoretical_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / 0.2 / 1.4)


def test_good_cheap_drafter_gets_long_blocks():
    ctl = AdaptiveK(k_max=8)
    feed(ctl, 0.9, 8, 400, t_draft=0.0005, t_verify=0.011)
    assert ctl.acceptance > 0.8
    assert ctl.choose() >= 5


def test_bad_drafter_falls_back_to_plain_and_probes():
    ctl = AdaptiveK(k_max=8, probe_every=16)
    feed(ctl, 0.05, 8, 400, t_draft=0.004, t_verify=0.014)
    assert ctl.speedup(ctl.best_k()) < 1.0
    decisions = []
    for _ in range(400):
        k = ctl.choose()
        decisions.append(k)
        ctl.observe_plain(0.010) if k == 0 else ctl.observe_spec(k, 0, 0.004 * k, 0.014)
    probes = sum(k > 0 for k in decisions)
    # it keeps probing, ever less often while probes keep saying plain: every 16 plain steps at
    # first, every 16 x 8 at most (25 probes without the backoff)
    assert 2 <= probes <= 5, decisions
    assert ctl.backoff == ctl.max_backoff
    # the drafter got good: the sparse probes notice it (in about 500 steps here; in the service a
    # new version also starts from its learners' estimate) and speculation resumes
    for step in range(1000):
        feed(ctl, 0.9, 8, 1, t_draft=0.0005, t_verify=0.011)
        if ctl.backoff == 1 and ctl.choose() > 0:
            break
    assert 100 < step < 1000  # later than without the backoff (a probe 16 steps on), but surely


def test_expensive_drafter_chooses_shorter_blocks():
    cheap, dear = AdaptiveK(k_max=8), AdaptiveK(k_max=8)
    feed(cheap, 0.7, 8, 300, t_draft=0.0003, t_verify=0.011)
    feed(dear, 0.7, 8, 300, t_draft=0.004, t_verify=0.011)
    assert dear.best_k() < cheap.best_k()


def test_ngram_proposes_the_continuation_of_the_latest_match():
    d = NGramDrafter(vocab_size=100, max_n=3)
    state = d.begin([])
    seq = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert d.propose(state, seq, 3, SamplingParams(), None).tokens.tolist() == [4, 5, 9]
    seq += [4, 5, 6, 7, 1, 2, 3]  # a later occurrence of 1 2 3 wins
    assert d.propose(state, seq, 2, SamplingParams(), None).tokens.tolist() == [4, 5]
    assert len(d.propose(d.begin([]), [1, 2, 3], 4, SamplingParams(), None)) == 0  # nothing to look up
    # a repeated token continues itself (an overlapping match), drafts matched like settled tokens
    assert d.propose(d.begin([]), [7, 7, 7], 2, SamplingParams(), None).tokens.tolist() == [7, 7]


def test_ngram_prefers_longer_matches():
    d = NGramDrafter(vocab_size=100, max_n=3)
    seq = [5, 1, 2, 8, 3, 1, 2, 9, 5, 1, 2]  # "1 2" last continued by 9, but "5 1 2" by 8
    assert d.propose(d.begin([]), seq, 1, SamplingParams(), None).tokens.tolist() == [8]


def test_batch_k_speculates_where_it_pays_and_decodes_plainly_where_verification_costs_too_much():
    """Costs shaped like SmolLM2 on 2 cores (ms): B=1 plain 31.5, k=4 verify 47.0; B=16 plain
    70.6, k=4 verify 160.7 (the verify cost grows with B x (k+1)); drafts accepted at 0.25 (k=1 at 16 rows: 1.25 x 70.6 / 93.9 < 1)."""
    from onlinespec.decode.adaptive import BatchK

    def verify_ms(batch, k):
        plain, per_pos = (31.5, 3.9) if batch == 1 else (70.6, 22.5)
        return plain + per_pos * k

    ctl = BatchK(k_max=8, probe_every=16)
    chosen = {1: [], 16: []}
    for i in range(600):
        for batch in (1, 16):
            rows = ["d"] * batch
            k = ctl.choose(rows)
            chosen[batch].append(k)
            if k:
                for r in range(batch):  # deterministic stream with acceptance 0.25
                    accepted = 0
                    while accepted < k and ((i * 7919 + r * 31 + accepted * 104729) % 1000) / 1000 < 0.25:
                        accepted += 1
                    ctl.observe_row("d", [False] * k, accepted)
            ctl.observe_step(batch, k, 0.0008 * k, verify_ms(batch, k) / 1000)
    late = {b: chosen[b][300:] for b in chosen}
    assert sum(k > 0 for k in late[1]) > 0.9 * len(late[1])  # alone: speculation pays
    assert sum(k == 0 for k in late[16]) > 0.85 * len(late[16])  # at 16 rows: plain batched decoding
    assert any(late[16]), "it keeps probing at 16 rows"
    assert 0.2 < ctl.proposer("d").acceptance < 0.32


@pytest.mark.parametrize("thompson", [True, False])
def test_a_cold_start_with_unlucky_first_blocks_still_finds_speculation_that_pays(thompson):
    """One row at a time (a request every 64 steps), a drafter accepted at 0.65 (k=1 pays from
    about 0.36 with these costs) whose first blocks are all rejected, so the estimate says plain.
    A probe takes copies only for a request its drafter has not encoded yet (as
    :class:`~onlinespec.decode.batch.Batch` does: encoding would make the probe cost several
    steps), and the copies find nothing. Drawing the blocks' acceptance from a posterior of a
    few blocks keeps speculating now and then, and the estimate recovers within a few tens of
    steps; with the means alone (``thompson=False``) only the backed-off probes of a request
    already encoded correct it, three times later (on the bundled pair, where a request's first
    blocks are the hardest, half of the cold starts at one user served a whole level plainly,
    1.3x slower, until this)."""
    from onlinespec.decode.adaptive import BatchK

    ctl = BatchK(k_max=8, thompson=thompson, seed=3)
    chosen, joined = [], False
    for i in range(320):
        joined = joined and i % 64 != 0  # a new request: its drafter has not encoded it
        k = ctl.choose(["d"])
        chosen.append(k)
        if k and ctl.probing(1) and not joined:
            ctl.observe_row(None, [], 0, asked=k)  # copies only, and nothing matched
        elif k:
            joined = True
            accepted = 0
            while accepted < k and i >= 8 and ((i * 7919 + accepted * 104729) % 1000) / 1000 < 0.65:
                accepted += 1
            ctl.observe_row("d", [False] * k, accepted)
        ctl.observe_step(1, k, 0.001 * k, (3.3 + 0.2 * k) / 1000)
    early = sum(k > 0 for k in chosen[:41]) / 41
    assert sum(k > 0 for k in chosen[128:]) > 0.9 * len(chosen[128:])  # both recover in the end
    assert ctl.proposer(ctl.rows_key("d")).acceptance > 0.5
    assert early > 0.6 if thompson else early < 0.4


def test_a_fixed_verify_cost_is_measured_so_long_blocks_are_tried():
    """A verify forward whose first drafted position costs most (on a CPU at 8 rows of SmolLM2:
    87 / 140 / 155 / 184 ms for k = 0 / 1 / 2 / 4). Priced per position alone from the first
    one-draft steps, k = 4 looked 4x as dear as k = 1 and the controller never drafted longer;
    measured per length, with lengths not measured priced optimistically, it settles near the
    best length."""
    t_plain, a, v, acceptance = 0.087, 0.045, 0.012, 0.8
    ctl = AdaptiveK(k_max=8, decay=0.95)
    ctl.observe_plain(t_plain)

    def true_speedup(k):
        return expected_tokens(acceptance, k) * t_plain / (0.001 * k + t_plain + a + v * k) if k else 1.0

    chosen = []
    for _ in range(200):
        k = ctl.choose(acceptance)
        chosen.append(k)
        if k:
            ctl.observe_costs(k, 0.001 * k, t_plain + a + v * k)
        else:
            ctl.observe_plain(t_plain)
    assert chosen[0] == 1  # the costs unmeasured: the shortest block first
    assert len(ctl.extra) >= 3 and all(e == pytest.approx(a + v * k, rel=0.05) for k, e in ctl.extra.items())
    best = max(true_speedup(k) for k in range(9))
    assert min(true_speedup(k) for k in chosen[-100:]) > 0.97 * best  # 1.64x; k = 1 forever gave 1.08x


def test_a_slow_first_step_does_not_keep_a_batch_at_a_length_that_pays_less():
    """At 16 rows of SmolLM2 verification grows faster than linearly past 80 positions (120 /
    200 / 220 / 400 ms for k = 0 / 3 / 4 / 8) and the first speculative step at that size was
    slow (280 ms at k = 1: a cache growing). A line ``v0 + v k`` fitted through that step and
    the k = 8 steps priced k = 4 at 1.5x what it took, and the batch stayed at k = 8 (156
    tokens/s where k = 4 gave 187). Measured per length, it finds the short lengths."""
    t_plain, acceptance = 0.120, 0.75
    verify = {1: 0.16, 2: 0.18, 3: 0.20, 4: 0.22, 5: 0.26, 6: 0.30, 7: 0.35, 8: 0.40}

    def true_speedup(k):
        return expected_tokens(acceptance, k) * t_plain / (0.001 * k + verify[k]) if k else 1.0

    ctl = AdaptiveK(k_max=8, decay=0.95)
    ctl.observe_plain(t_plain)
    chosen = []
    for step in range(60):
        k = ctl.choose(acceptance)
        chosen.append(k)
        if k:
            ctl.observe_costs(k, 0.001 * k, 0.28 if step == 0 else verify[k])
        else:
            ctl.observe_plain(t_plain)
    assert chosen[0] == 1
    best = max(true_speedup(k) for k in range(1, 9))
    assert min(true_speedup(k) for k in chosen[-30:]) > 0.97 * best, chosen


def test_plain_steps_refresh_a_batch_size_whose_plain_cost_rests_on_few_steps():
    """A batch size whose plain cost was measured once (in a ramp-up) takes a plain step every
    ``plain_every / 8`` speculative ones until ``FIRST`` plain steps are measured, then every
    ``plain_every``."""
    ctl = AdaptiveK(k_max=4, decay=0.95, plain_every=32)
    ctl.observe_plain(0.138)
    chosen = []
    for _ in range(80):
        k = ctl.choose(0.9)
        chosen.append(k)
        if k:
            ctl.observe_costs(k, 0.001 * k, 0.2)
        else:
            ctl.observe_plain(0.120)
    plain = [i for i, k in enumerate(chosen) if k == 0]
    assert plain[:2] == [4, 9] and plain[2] == 9 + 32 + 1  # two quick refreshes, then every 32
    assert ctl.t_plain == pytest.approx(0.120)  # the median of the three plain steps


def test_a_first_step_that_pays_once_does_not_price_every_step():
    """The first speculative step at a batch size paid 229 ms for what later steps reuse (a
    drafter's first forward at a new shape); the drafting cost starts from the median of its
    first timings, so speculation goes on. A cost first measured as nothing (copies alone
    drafted) still rises to what drafting costs."""
    ctl = AdaptiveK(k_max=8, decay=0.95)
    ctl.observe_plain(0.09)
    ctl.observe_costs(1, 0.25, 0.14)
    for _ in range(2):
        ctl.observe_costs(4, 0.02, 0.18)
    assert ctl.t_draft == pytest.approx(0.005)
    assert ctl.choose(0.8) >= 3

    ctl = AdaptiveK(k_max=8, decay=0.95)
    ctl.observe_plain(0.09)
    for seconds in [0.0] * 3 + [0.02] * 40:
        ctl.observe_costs(4, seconds, 0.18)
    assert ctl.t_draft > 0.003


def test_all_or_nothing_blocks_are_priced_by_how_far_they_get():
    """Suffix copies are all or nothing: where the text repeats a span is accepted, where it
    does not the row gets one token. Half of each at k = 4 yields 3.0 tokens a step; one
    acceptance for every position (0.8 here) promised 3.36."""
    from onlinespec.decode.adaptive import BlockLengths

    lengths = BlockLengths(k_max=8, decay=0.98)
    for _ in range(200):
        lengths.observe([(4, False), (0, True)])
    assert lengths.tokens(4, 0.8) == pytest.approx(3.0, abs=0.02)
    assert lengths.tokens(1, 0.8) == pytest.approx(1.5, abs=0.02)
    assert expected_tokens(0.8, 4) > 3.3


def test_a_batch_of_copy_blocks_that_does_not_pay_decodes_plainly():
    """8 rows of copies: half of the blocks find no match (one token), half copy a span accepted
    at 0.9 a position. With these costs no draft length gains more than 2% (k = 4), most lose
    (k = 1: 0.91x, k = 8: 0.96x). The acceptance per position alone (about 0.6) promised more
    than that and speculated in 97% of the steps, at lengths that lost (0.976x overall). Priced
    by how far blocks get, the batch decodes plainly but for its probes."""
    import random

    from onlinespec.decode.adaptive import BatchK

    rng = random.Random(0)
    t_plain = 0.1
    ctl = BatchK(k_max=8)
    chosen, tokens, seconds = [], 0, 0.0
    for _ in range(600):
        k = ctl.choose([None] * 8)
        chosen.append(k)
        step = t_plain * (1.3 + 0.3 * k) if k else t_plain
        tokens += 0 if k else 8
        for _ in range(8) if k else ():
            if rng.random() < 0.5:
                ctl.observe_row(None, [], 0, asked=k)  # no match: nothing drafted
                tokens += 1
                continue
            accepted = 0
            while accepted < k and rng.random() < 0.9:
                accepted += 1
            ctl.observe_row(None, [True] * k, accepted)
            tokens += accepted + 1
        ctl.observe_step(8, k, 0.0, step)
        seconds += step
    assert sum(k > 0 for k in chosen[300:]) < 0.1 * 300, chosen[300:]
    assert tokens / seconds >= 0.99 * 8 / t_plain


def test_a_full_batch_is_not_priced_from_the_ramp_up():
    """Costs are shared by half octaves of batch size: the steps of 9 to 12 rows a level ramps up
    and drains through (cheaper) do not price a full batch of 16, whose speculative steps an
    octave bucket priced 8-9% below what they took."""
    from onlinespec.decode.adaptive import BatchK

    ctl = BatchK()
    assert [ctl.bucket(b) for b in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 25)] == \
        [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 16, 16, 24, 24, 32]
    assert ctl.at(16) is ctl.at(13) and ctl.at(16) is not ctl.at(12) and ctl.at(12) is ctl.at(9)


def test_rows_whose_own_drafts_fail_make_the_batch_decode_plainly():
    """The batch's draft length is chosen on what its rows yield: rows that drafted long enough
    yield as their own acceptance says (at 16 users of SmolLM2 the 2-row steps of the drain
    speculated on their source's acceptance, 1.4 tokens a row, 28 ms a token against 21 plain).
    Rows of the same source whose drafts were accepted keep the batch speculating; rows with no
    history of their own are judged on the source."""
    from onlinespec.decode.adaptive import BatchK

    ctl = BatchK(k_max=8, thompson=False)
    costs = ctl.at(2)
    costs.t_plain, costs.t_draft = 0.043, 0.001
    costs.extra = {k: 0.02 + 0.008 * k for k in range(1, 9)}
    src = ctl.proposer(ctl.rows_key("d"))
    src.accepted, src.rejected = 16.0, 4.0  # its blocks accepted at 0.8
    assert ctl.choose(["d", "d"], batch=2) > 0
    assert ctl.choose(["d", "d"], batch=2, own=[None, None]) > 0
    assert ctl.choose(["d", "d"], batch=2, own=[(2, 12), (1, 10)]) == 0  # their drafts fail
    assert ctl.choose(["d", "d"], batch=2, own=[(40, 4), (35, 3)]) > 0  # theirs are accepted
    # what a failing row yields counts only the positions it would draft
    low = ctl.blocks(["d"], own=[(2, 12)], batch=2)
    assert 1.0 < low(8) < 1.35


def test_a_row_whose_own_drafts_fare_worse_drafts_fewer():
    """In a step of 16 rows at k = 5 (a position costs 0.13 / 5 s of verification against a
    0.12 s plain step) a row whose drafts were mostly rejected drafts one position, one whose
    drafts were mostly accepted drafts all five, and a row with no history drafts as its source
    says; the batch size cancels; nothing measured, nothing is cut."""
    from onlinespec.decode.adaptive import BatchK

    ctl = BatchK(k_max=8)
    assert ctl.row_length("d", 5, 16, accepted=0, rejections=10) == 5  # costs not measured
    costs = ctl.at(16)
    costs.t_plain, costs.t_draft, costs.extra = 0.12, 0.001, {5: 0.13}
    src = ctl.proposer(ctl.rows_key("d"))
    src.accepted, src.rejected = 15.0, 5.0  # blocks accepted at 0.75
    assert ctl.row_length("d", 5, 16, accepted=2, rejections=8) == 1
    assert ctl.row_length("d", 5, 16, accepted=30, rejections=5) == 5
    assert ctl.row_length("d", 5, 16, accepted=0, rejections=0) == 5  # 0.75^5 = 0.24 >= 0.22
    assert ctl.row_length("d", 5, 16, accepted=0, rejections=40) == 0  # a row that never gets a draft
    ctl.at(4).t_plain, ctl.at(4).t_draft, ctl.at(4).extra = 0.03, 0.001, {5: 0.0325}
    assert ctl.row_length("d", 5, 4, accepted=2, rejections=8) == 1  # the same share of a step
