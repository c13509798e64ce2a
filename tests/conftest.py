import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores

from tests.tiny import perturbed, tiny_llama, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def target():
    return tiny_llama(layers=2, hidden=64, seed=0)


@pytest.fixture(scope="session")
def close_drafter_model(target):
    """Agrees with the target often: long accepted blocks and some rejections."""
    return perturbed(target, 0.05, seed=1)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def redis_url():
    """A Redis server of the tests' own: started here, unless ONLINESPEC_TEST_REDIS_URL names one
    reserved for tests. Nothing ever flushes a server the tests did not start."""
    url = os.environ.get("ONLINESPEC_TEST_REDIS_URL")
    if url:
        yield url
        return
    from onlinespec.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    yield server.url
    server.stop()


@pytest.fixture()
def redis_client(redis_url):
    """A client on a server the tests own; each test gets a clean keyspace there."""
    from onlinespec.redis_server import connect

    client = connect(redis_url)
    if not os.environ.get("ONLINESPEC_TEST_REDIS_URL"):
        client.flushdb()  # our own server: safe
    yield client
    client.close()


@pytest.fixture()
def service(tmp_path, redis_url, redis_client, monkeypatch):
    """The server process as `onlinespec serve` builds it, on tiny models (tests/services.py),
    with this session's Redis: (server, config, directory)."""
    from tests.services import write_service

    config = write_service(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis_url)
    from serving.__main__ import build
    from serving.server import BackgroundServer

    app, state, cfg, cleanup = build(config)
    srv = BackgroundServer(state, app=app).start()
    yield srv, cfg, tmp_path
    srv.stop()
    cleanup()
