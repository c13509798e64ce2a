"""The server process as `onlinespec serve` builds it from a config: models loaded by path,
Redis feedback, admin API behind a token, dashboard data, and an RQ worker process learning."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from onlinespec.feedback import keys
from tests.services import TOKEN, write_service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def admin(srv, method, path, token=TOKEN, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, srv.url + "/admin" + path, headers=headers, timeout=30, **kw)


def test_admin_routes_need_the_token(service):
    srv, _, _ = service
    assert admin(srv, "GET", "/drafters", token=None).status_code == 401
    assert admin(srv, "GET", "/drafters", token="wrong").status_code == 401
    for header in (TOKEN, f"Token {TOKEN}", f"Bearer{TOKEN}", "Bearer s3cr\u00e9t".encode()):  # strict, never a 500
        r = httpx.get(srv.url + "/admin/drafters", headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401, header
    assert httpx.get(srv.url + "/admin/drafters", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    body = admin(srv, "GET", "/drafters").json()
    assert [d["id"] for d in body["drafters"]] == ["d1", "d2"]
    assert body["drafters"][0]["latest"] == 1 and body["drafters"][0]["learner"]["trainable"] == "lm_head"
    d1, d2 = (d["learner"] for d in body["drafters"])  # d2's own settings over the learner YAML's
    assert (d1["regret_window"], d1["optim"]["eps"]) == (20, 1e-8)
    assert (d2["regret_window"], d2["optim"]["eps"], d2["optim"]["lr"], d2["optim"]["hint"], d2["trainable"]) == \
        (7, 1e-6, 0.05, "last", "lm_head")


def test_admin_learner_settings_are_validated_and_applied(service, redis_client):
    srv, _, _ = service
    r = admin(srv, "PUT", "/drafters/d1/learner", json={"optim": {"lr": 0.2}, "ensemble_size": 3})
    assert r.status_code == 200 and r.json()["optim"]["lr"] == 0.2 and r.json()["optim"]["adaptive"] is True
    stored = json.loads(redis_client.get(keys.learner_config("d1")))
    assert stored["ensemble_size"] == 3
    bad = admin(srv, "PUT", "/drafters/d1/learner", json={"optim": {"hint": "psychic"}})
    assert bad.status_code == 400 and "hint" in bad.json()["error"]["message"]
    assert admin(srv, "PUT", "/drafters/nope/learner", json={}).status_code == 404
    assert admin(srv, "POST", "/drafters/d1/pause").json()["paused"] is True
    assert redis_client.exists(keys.paused_key("d1"))
    assert admin(srv, "POST", "/drafters/d1/resume").json()["paused"] is False
    assert admin(srv, "POST", "/drafters/d1/update").status_code == 200
    assert admin(srv, "POST", "/drafters/d1/update").status_code == 409  # one in flight
    assert admin(srv, "POST", "/drafters/d1/rollback", json={"version": 99}).status_code == 400


def test_dashboard_data_shows_details_only_to_the_admin(service, redis_client):
    srv, _, _ = service
    redis_client.xadd(keys.events_stream, {"type": "refused", "drafter": "d1", "version": 9,
                                           "reason": "/secret/path/v9: checksum mismatch"})
    public = httpx.get(srv.url + "/dashboard/data", timeout=30).json()
    assert public["admin"] is False and [d["id"] for d in public["drafters"]] == ["d1", "d2"]
    assert all("learner" not in d for d in public["drafters"])
    assert public["events"] and all("reason" not in e for e in public["events"])
    full = httpx.get(srv.url + "/dashboard/data", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert full["admin"] is True and full["drafters"][0]["learner"]["trainable"] == "lm_head"
    assert any("checksum" in e.get("reason", "") for e in full["events"])


def test_dashboard_data_shows_traffic_per_domain_routing_and_why_a_version_does_not_serve(service, redis_client):
    srv, cfg, tmp = service
    for i, domain in enumerate(["code", "code", "stories"]):
        r = httpx.post(srv.url + "/v1/completions", timeout=60, headers={"Authorization": "Bearer k1"},
                       json={"model": "tiny", "prompt": f"abc{i}", "max_tokens": 8, "metadata": {"domain": domain}})
        assert r.status_code == 200, r.text
    bad = httpx.post(srv.url + "/v1/completions", timeout=60,
                     json={"model": "tiny", "prompt": "x", "max_tokens": 4, "metadata": {"domain": "x" * 65}})
    assert bad.status_code == 400 and "domain" in bad.json()["error"]["message"]
    data = httpx.get(srv.url + "/dashboard/data", timeout=30).json()
    assert {t["group"]: t["requests"] for t in data["traffic"]} == {"domain:code": 2, "domain:stories": 1}
    assert sum(data["routing"].values()) == pytest.approx(1.0) and set(data["routing"]) == {"d1", "d2"}
    import serving.engine_loop

    serving.engine_loop.MAX_TRAFFIC_GROUPS = 2  # clients name domains: the table stays bounded
    try:
        httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "q", "max_tokens": 2, "metadata": {"domain": "fresh"}})
    finally:
        serving.engine_loop.MAX_TRAFFIC_GROUPS = 256
    traffic = {t["group"]: t["requests"] for t in httpx.get(srv.url + "/dashboard/data", timeout=30).json()["traffic"]}
    assert traffic == {"domain:code": 2, "domain:stories": 1, "other": 1}
    assert all(d["status"] == "" for d in data["drafters"])  # each serves its latest
    # a version that fails validation is latest but does not serve: the dashboard says why
    from onlinespec.learn.registry import Registry

    registry = Registry(cfg.registry, redis_client)
    model = registry.load_model("d1", 1)[0]
    watcher = srv.state.loop.watcher
    watcher.stop()  # its thread would validate the new version (woken by the publish) before the file breaks
    v2 = registry.publish("d1", model, parent=1).version
    (registry.path("d1", v2) / "model.safetensors").write_bytes(b"broken")
    watcher.check("d1")
    data = httpx.get(srv.url + "/dashboard/data", timeout=30).json()
    d1 = next(d for d in data["drafters"] if d["id"] == "d1")
    assert d1["serving_version"] == 1 and d1["latest"] == v2 and d1["status"].startswith("refused")


def test_admin_disabled_without_a_token(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serving.admin import admin_router

    app = FastAPI()
    app.include_router(admin_router(None, None, None, {}, "t"))
    r = TestClient(app).get("/admin/drafters", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "disabled" in r.json()["detail"]


@pytest.mark.slow
def test_served_traffic_is_learned_and_swapped_in(service, redis_url):
    srv, cfg, tmp = service
    env = {**os.environ, "PYTHONPATH": ROOT, "REDIS_URL": redis_url}
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--target", "tiny", "--registry", cfg.registry,
                               "--round-records", "8", "--period", "1", "--learner-config", cfg.learner],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        i = 0
        while time.time() < deadline:
            httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": f"abc{i % 7}def", "max_tokens": 24, "temperature": 1.0, "seed": i})
            i += 1
            versions = {d["id"]: d["serving_version"] for d in admin(srv, "GET", "/drafters").json()["drafters"]}
            if versions["d1"] >= 4 and versions["d2"] >= 3:
                break
    finally:
        worker.send_signal(signal.SIGTERM)
        try:  # a warm shutdown waits for the round in progress, slow on a loaded machine
            log = worker.communicate(timeout=90)[0]
        except subprocess.TimeoutExpired:  # what it learned is asserted below, not how fast it stops
            worker.kill()
            log = worker.communicate()[0]
    assert versions["d1"] >= 4 and versions["d2"] >= 3, log[-2000:]
    data = httpx.get(srv.url + "/dashboard/data", timeout=30).json()
    assert data["rounds"]["d1"] and data["rounds"]["d1"][-1]["served_loss"] >= 0
    assert any(e["type"] == "published" for e in data["events"])
    metrics = httpx.get(srv.url + "/metrics").text
    assert "onlinespec_feedback_written_total" in metrics and 'version="' in metrics
    html = httpx.get(srv.url + "/dashboard").text
    assert "<svg" in html and "http" not in html.split("<script>")[1]  # no CDN: nothing fetched from outside


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_dashboard_renders_live_data_in_headless_chromium(service, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium): dashboard browser test skipped")
    srv, _, _ = service
    sampler = srv.state.extra["sampler"]
    sampler.sample()
    for i in range(3):
        httpx.post(srv.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": f"xyz{i}", "max_tokens": 20, "temperature": 0})
        sampler.sample()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=6000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", srv.url + "/dashboard"],
                         capture_output=True, text=True, timeout=120).stdout
    subprocess.run([browser, *flags, "--window-size=1280,900", f"--screenshot={tmp_path / 'dashboard.png'}",
                    srv.url + "/dashboard"], capture_output=True, timeout=120)
    import re

    points = {m.group(1): int(m.group(2)) for m in re.finditer(r'<svg id="(\w+)"[^>]*data-points="(\d+)"', dom)}
    assert points.get("accept", 0) > 0, dom[:2000]  # accepted length per drafter version, from the live server
    assert points.get("lag", 0) > 0
    # one series per drafter (its own drafts) with its version marked, suffix copies apart, a time axis
    assert 'class="series"' in dom and 'class="marker"' in dom and ">v1<" in dom and 'class="tick"' in dom
    assert re.search(r"■ d[12]<", dom) and "v1</span>" not in dom  # the legend names drafters, not versions
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_traffic_and_watch_commands_against_the_live_server(service, capsys):
    from onlinespec.cli import build_parser
    from onlinespec.ops.traffic import run as traffic
    from onlinespec.ops.watch import run as watch

    srv, _, _ = service
    args = build_parser().parse_args(["traffic", "--url", srv.url, "--schedule", "python:3,docs:3,json:2", "--by-count",
                                      "--concurrency", "2", "--max-tokens", "12", "--json"])
    assert traffic(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["requests"] >= 8 and summary["errors"] == 0
    # the pool has no weights yet: each request's drafter is drawn uniformly
    assert {r["drafter"] for r in summary["by_version"]} <= {"d1", "d2"}
    assert all(r["mean_accepted_length"] >= 1 for r in summary["by_version"])
    assert [p["domain"] for p in summary["by_phase"]] == ["python", "docs", "json"]  # json: chat completions
    assert sum(p["requests"] for p in summary["by_phase"]) == summary["requests"]
    assert all(p["mean_accepted_length"] >= 1 for p in summary["by_phase"])
    srv.state.extra["sampler"].sample()
    assert watch(build_parser().parse_args(["watch", "--url", srv.url, "--once"])) == 0
    screen = capsys.readouterr().out
    assert "d1: serving v1" in screen and "d2: serving v1" in screen and "queue depth" in screen


def test_traffic_of_conversations_reads_their_earlier_turns_from_the_prefix_cache(service, capsys):
    from onlinespec.cli import build_parser
    from onlinespec.ops.traffic import run as traffic
    from onlinespec.ops.watch import run as watch

    srv, _, _ = service
    args = build_parser().parse_args(["traffic", "--url", srv.url, "--schedule", "question:6", "--by-count",
                                      "--concurrency", "1", "--max-tokens", "8", "--turns", "3", "--json"])
    assert traffic(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["requests"] >= 6 and summary["errors"] == 0  # the phase ends at its next check
    # conversations of three turns: each later turn begins with the turns before it
    assert summary["cached_share"] > 0.5 and summary["cached_tokens"] <= summary["prompt_tokens"]
    metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    hit = [line for line in metrics.splitlines() if line.startswith("onlinespec_prefix_cache_hit_tokens_total ")]
    assert float(hit[0].split()[1]) >= summary["cached_tokens"]
    seen = httpx.get(srv.url + "/dashboard/data", timeout=30).json()["prefix_cache"]
    assert seen["hit"] >= summary["cached_tokens"] and 0.3 < seen["hit_share"] <= 1 and seen["bytes"] > 0
    assert watch(build_parser().parse_args(["watch", "--url", srv.url, "--once"])) == 0
    assert "prefix cache: " in capsys.readouterr().out


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(c) for c in f.read().split()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc to list child processes")
def test_up_stops_everything_it_started_on_sigterm(tmp_path):
    """`onlinespec up` killed the usual way (SIGTERM: kill, systemd, a supervisor) stops the
    server, the workers and the Redis it started, not only itself."""
    from onlinespec.redis_server import _free_port

    config = write_service(tmp_path, "workers: {count: 1, period: 1}\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # up starts its own Redis
    env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    up = subprocess.Popen([sys.executable, "-m", "onlinespec", "up", "--config", config, "--port", str(port)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        for line in up.stdout:
            if "send traffic" in line or time.time() > deadline:
                break
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).status_code == 200
        started = _children(up.pid)
        assert len(started) == 3, started  # redis-server, the server, one worker
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
        assert up.returncode == 0 and "stopping" in out
        deadline = time.time() + 10
        while any(_alive(p) for p in started) and time.time() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_traffic_pools_the_accepted_length_over_requests():
    """Tokens per draft step over all requests, not a mean of per-request means."""
    from onlinespec.ops.traffic import _Stats

    stats = _Stats()
    for accepted, steps, phase in ((6, 2, 0), (0, 4, 0), (3, 3, 1)):
        body = {"usage": {"completion_tokens": accepted + steps},
                "speculative": {"drafter_id": "d", "drafter_version": 1, "accepted_tokens": accepted,
                                "draft_steps": steps, "mean_accepted_length": (accepted + steps) / steps,
                                "copied_accepted_tokens": accepted // 3}}
        stats.add(body, phase)
    assert stats.by_phase[0].copied_share == pytest.approx(2 / 6) and stats.by_phase[1].copied_share == pytest.approx(1 / 3)
    assert stats.by_phase[0].mean_accepted_length == pytest.approx((6 + 0 + 2 + 4) / 6)
    assert stats.by_phase[1].mean_accepted_length == pytest.approx(2.0)
    assert stats.by_version[("d", 1)].mean_accepted_length == pytest.approx((9 + 9) / 9)
    old = {"usage": {"completion_tokens": 8}, "speculative": {"accepted_tokens": 6, "mean_accepted_length": 4.0}}
    stats.add(old, 2)  # a server without draft_steps: recovered from the mean
    assert stats.by_phase[2].draft_steps == 2


def test_device_and_dtype_come_from_the_config(tmp_path):
    from serving.__main__ import build
    from serving.server import BackgroundServer

    config = write_service(tmp_path)
    text = open(config).read().replace("threads: 1}", "threads: 1, dtype: bfloat16, device: auto}")
    open(config, "w").write(text)
    app, state, cfg, cleanup = build(config, no_redis=True)
    try:
        engine = state.loop.engine
        assert engine.target.dtype == torch.bfloat16 and engine.drafter.model.dtype == torch.bfloat16
        srv = BackgroundServer(state, app=app).start()
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "abcabc", "max_tokens": 12,
                                                          "temperature": 0}, timeout=60)
        srv.stop()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        cleanup()
    if not torch.cuda.is_available():
        open(config, "w").write(text.replace("device: auto", "device: cuda"))
        with pytest.raises(ValueError, match="no CUDA device"):
            build(config, no_redis=True)
    open(config, "w").write(text.replace("dtype: bfloat16", "dtype: float8"))
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        build(config, no_redis=True)
