"""Prefix-affinity keys (api/affinity.py): what makes two requests share a prefix, and the table."""

from __future__ import annotations

import json

from kawai.api.affinity import PrefixTable, affinity_chain, tenant_key

SYSTEM = "You are a careful assistant."
TOOLS = [{"name": "get_weather", "description": "Weather.", "input_schema": {"type": "object"}}]


def body(messages, system=SYSTEM, tools=TOOLS, **extra) -> bytes:
    return json.dumps({"model": "m", "max_tokens": 10, "system": system, "tools": tools, "messages": messages,
                       **extra}).encode()


def turn(text):
    return {"role": "user", "content": text}


def test_turn_two_extends_turn_one():
    one = affinity_chain("t", body([turn("hi")]))
    two = affinity_chain("t", body([turn("hi"), {"role": "assistant", "content": "hello"}, turn("more")]))
    assert len(one) == 2 and len(two) == 4
    assert two[:2] == one


def test_what_does_not_change_the_prompt_does_not_change_the_key():
    base = affinity_chain("t", body([turn("hi")]))
    # string content == one text block; cache_control moves between turns; sampling parameters
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]
    assert affinity_chain("t", body(blocks, temperature=0.1, max_tokens=99)) == base
    # Claude Code's per-request billing header is dropped by the route before rendering, and here too
    billing = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abc;"},
               {"type": "text", "text": SYSTEM}]
    plain = [{"type": "text", "text": SYSTEM}]
    assert affinity_chain("t", body([turn("hi")], system=billing)) == affinity_chain("t", body([turn("hi")], system=plain))


def test_what_changes_the_prompt_changes_the_key():
    base = affinity_chain("t", body([turn("hi")]))
    assert affinity_chain("other tenant", body([turn("hi")]))[0] != base[0]
    assert affinity_chain("t", body([turn("hi")], system="Another system."))[0] != base[0]
    assert affinity_chain("t", body([turn("hi")], tools=[]))[0] != base[0]
    changed = affinity_chain("t", body([turn("hello")]))
    assert changed[0] == base[0] and changed[1] != base[1]  # same head, different first message


def test_not_a_messages_request_has_no_chain():
    assert affinity_chain("t", b"") == ()
    assert affinity_chain("t", b"{not json") == ()
    assert affinity_chain("t", b"[1, 2]") == ()
    assert affinity_chain("t", json.dumps({"model": "m", "messages": "hi"}).encode()) == ()
    assert affinity_chain("t", b"[" * 100_000) == ()  # nested too deeply: no chain, no crash


def test_tenant_key_is_stable_and_not_the_token():
    assert tenant_key(None) is None
    assert tenant_key("kawai-secret") == tenant_key("kawai-secret") != tenant_key("kawai-other")
    assert "secret" not in tenant_key("kawai-secret")


def test_table_finds_the_longest_prefix_among_live_replicas():
    table = PrefixTable()
    one = affinity_chain("t", body([turn("hi")]))
    two = affinity_chain("t", body([turn("hi"), {"role": "assistant", "content": "yo"}, turn("more")]))
    other = affinity_chain("t", body([turn("something else")]))
    table.record(one, "A")
    table.record(other, "B")  # shares only the head with `one`: the head now points at B
    assert table.lookup(two, ["A", "B"]) == ("A", 2)
    assert table.lookup(two, ["B"]) == ("B", 1)  # A is not a candidate: the shared head is still on B
    assert table.lookup(two, ["C"]) == (None, 0)
    table.forget("B")
    assert table.lookup(other, ["A", "B"]) == (None, 0)
    assert table.lookup(two, ["A", "B"]) == ("A", 2)


def test_table_is_bounded_least_recently_used_first():
    table = PrefixTable(max_entries=4)
    a = affinity_chain("t", body([turn("a")]))  # 2 links
    b = affinity_chain("u", body([turn("b")]))  # 2 links, another tenant
    table.record(a, "A")
    table.record(b, "B")
    assert len(table) == 4
    table.lookup(a, ["A"])  # a's full chain is now the most recently used
    c = affinity_chain("v", body([turn("c")]))
    table.record(c, "C")
    assert len(table) == 4
    assert table.lookup(b, ["B"]) == (None, 0)  # b's links were the oldest
    assert table.lookup(c, ["C"]) == ("C", 2)



def test_a_body_with_more_values_than_a_replica_accepts_has_no_chain():
    """Counted before decoding: the proxy never builds a million Python objects for a request the replica
    refuses with 400 anyway."""
    from kawai.api.limits import MAX_JSON_VALUES, count_json_values

    def body(n: int) -> bytes:
        numbers = b",".join([b"0"] * n)
        return b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": [' + numbers + b"]}"

    n = MAX_JSON_VALUES - count_json_values(body(1)) + 1  # the most a replica accepts
    assert count_json_values(body(n)) == MAX_JSON_VALUES and affinity_chain(None, body(n)) != ()
    assert affinity_chain(None, body(n + 1)) == ()
