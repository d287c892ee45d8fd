"""serve's bind rules without binding anything: what counts as loopback, and the warning for serving
beyond loopback without a key (nothing listens: the port check and the pool are replaced)."""

from __future__ import annotations

import logging

import pytest

from llama_lora import serve


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.20", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert serve.is_loopback(host) is loopback


class _Stop(Exception):
    pass


def _stop(*_a, **_k):
    raise _Stop


@pytest.mark.parametrize("host,key,warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                                             ("127.0.0.1", None, False)])
def test_beyond_loopback_without_a_key_warns(host, key, warned, monkeypatch, caplog):
    import llama_lora.serve.pool as pool

    monkeypatch.setattr(serve, "_check_port", lambda h, p: None)
    monkeypatch.setattr(pool, "Pool", _stop)  # stop right after the start-up checks
    with caplog.at_level(logging.WARNING, logger="llama_lora.serve"), pytest.raises(_Stop):
        serve.run([], host=host, port=8000, api_key=key)
    said = any("without an API key" in r.getMessage() and host in r.getMessage() for r in caplog.records)
    assert said is warned
