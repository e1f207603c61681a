"""The token store (api/api_keys.py) and the `kawai tokens` command."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone

import pytest

from kawai.api.cli import main
from kawai.api.api_keys import ENDPOINTS, Limit, TokenStore, TokenStoreError, hash_token, parse_endpoints


def test_created_token_is_random_prefixed_and_stored_only_as_a_hash(tmp_path):
    store = TokenStore(tmp_path)
    rec, secret = store.create("laptop", ENDPOINTS)
    rec2, secret2 = store.create("ci", ("messages",))
    assert secret.startswith("kawai-") and len(secret) >= len("kawai-") + 22  # >= 128 bits of base62
    assert secret != secret2 and rec.id != rec2.id
    raw = (tmp_path / "tokens.json").read_text()
    assert secret not in raw and secret2 not in raw
    assert hash_token(secret) in raw and rec.prefix == secret[:10]
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600


def test_authenticate_matches_only_the_exact_token(tmp_path):
    store = TokenStore(tmp_path)
    rec, secret = store.create("a", ENDPOINTS)
    assert store.authenticate(secret).id == rec.id
    for wrong in ("", secret[:-1], secret + "x", secret.upper(), rec.prefix, hash_token(secret), "x" * 10_000):
        assert store.authenticate(wrong) is None


def test_revoke_takes_effect_for_a_running_store(tmp_path):
    server_side = TokenStore(tmp_path)
    rec, secret = TokenStore(tmp_path).create("a", ENDPOINTS)
    assert server_side.authenticate(secret) is not None
    TokenStore(tmp_path).revoke(rec.id)  # another process (the CLI)
    assert server_side.authenticate(secret) is None
    with pytest.raises(TokenStoreError):
        server_side.revoke(rec.id)


def test_limits_count_per_calendar_period(tmp_path):
    store = TokenStore(tmp_path)
    rec, _ = store.create("a", ENDPOINTS, Limit.parse("2/day"))
    day = datetime(2026, 3, 31, 23, 59, 0, tzinfo=timezone.utc)
    assert store.consume(rec, day) is None and store.consume(rec, day) is None
    exceeded = store.consume(rec, day)
    assert exceeded is not None and 1 <= exceeded.retry_after_seconds <= 61
    assert store.consume(rec, datetime(2026, 4, 1, 0, 0, 1, tzinfo=timezone.utc)) is None  # a new day
    monthly, _ = store.create("b", ENDPOINTS, Limit.parse("1/month"))
    assert store.consume(monthly, day) is None
    assert store.consume(monthly, day).retry_after_seconds == 61
    # counts survive a restart
    assert TokenStore(tmp_path).consume(monthly, day) is not None


@pytest.mark.parametrize("text", ["", "0/day", "5/week", "-1/day", "day", "1e3/day", "99999999999/day"])
def test_bad_limits_are_refused(text):
    with pytest.raises(TokenStoreError):
        Limit.parse(text)


def test_endpoint_parsing():
    assert parse_endpoints("messages, models") == ("messages", "models")
    for bad in ("", "messages,admin", ","):
        with pytest.raises(TokenStoreError):
            parse_endpoints(bad)


def test_corrupt_token_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(TokenStoreError, match="tokens.json"):
        TokenStore(tmp_path).authenticate("kawai-x")


def test_tokens_cli_create_list_revoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAWAI_HOME", str(tmp_path))
    args = ["tokens", "create", "--name", "ci", "--endpoints", "messages,count_tokens", "--limit", "100/month"]
    assert main(args) == 0
    out = capsys.readouterr().out
    secret = next(word for word in out.split() if word.startswith("kawai-"))
    token_id = json.loads((tmp_path / "tokens.json").read_text())["tokens"][0]["id"]
    assert main(["tokens", "list"]) == 0
    listing = capsys.readouterr().out
    assert token_id in listing and "100/month" in listing and secret not in listing
    assert main(["tokens", "create", "--name", "x", "--endpoints", "admin"]) == 1
    assert "endpoints" in capsys.readouterr().err
    assert main(["tokens", "revoke", token_id]) == 0
    assert main(["tokens", "revoke", token_id]) == 1
    assert "no token" in capsys.readouterr().err


def test_quota_is_shared_by_every_process_using_the_home(tmp_path):
    """Two stores on one home (two server processes) count together: 5 requests a day in all, with
    both consuming at once from several threads; a fresh store (a restart) remembers."""
    import threading

    rec, _ = TokenStore(tmp_path).create("shared", ENDPOINTS, Limit.parse("5/day"))
    stores = [TokenStore(tmp_path), TokenStore(tmp_path)]
    results = []

    def use(store):
        for _ in range(4):
            results.append(store.consume(rec) is None)

    threads = [threading.Thread(target=use, args=(stores[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 5 and len(results) == 16
    assert TokenStore(tmp_path).consume(rec) is not None
