"""Fault tests against real processes on loopback (Redis, server and worker as supervised child
processes, as `onlinespec up` runs them): the scenarios of `onlinespec bench faults`, on tiny
models, each asserting that every request completed or got a clear error, that no record was
learned twice, and that learning resumed without a human."""

import pytest

from onlinespec.ops.bench.faults import SCENARIOS, run_scenario
from tests.services import write_service

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fault_scenario(tmp_path, scenario):
    config = write_service(tmp_path)
    r = run_scenario(scenario, config, tmp_path / "run", warmup=10, after=90, min_idle_ms=5000)
    assert r.sent > 10 and r.broken == 0, r
    assert r.completed + r.refused == r.sent, r  # every request answered: a result or a clear error
    assert r.refused == (1 if scenario == "hostile_seed" else 0), r
    assert r.relearned == 0, r  # nothing learned twice
    assert r.feedback_lost == 0, r  # Redis away for seconds: buffered, then written
    assert r.resumed_s is not None, r  # a new version after the fault, without a human
    assert all(r.checks.values()), r.checks
