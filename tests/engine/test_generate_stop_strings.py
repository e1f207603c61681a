"""StopMatcher: stop strings across arbitrary text pieces, against a whole-text oracle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kawai.engine.stop_strings import StopMatcher


def oracle(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Read left to right; stop at the first position where some stop string ends (the longest wins)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[: end - len(stop)], stop
    return text, None


def run(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, str | None, list[str]]:
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    for piece in pieces:
        text, matched = matcher.push(piece)
        emitted.append(text)
        if matched is not None:
            return "".join(emitted), matched, emitted
        # Whatever is held back could still become a stop string.
        assert any(s.startswith(matcher.held) and len(s) > len(matcher.held) for s in stops) or not matcher.held
    emitted.append(matcher.flush())
    return "".join(emitted), None, emitted


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)] or [""]


ALPHABET = "ab<>/é日\n"


@settings(max_examples=400, deadline=None)
@given(
    st.text(ALPHABET, max_size=40),
    st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=3),
    st.lists(st.integers(0, 100), max_size=20),
)
def test_any_split_gives_the_oracle_answer(text, stops, cuts):
    stops = tuple(stops)
    assert run(split(text, cuts), stops)[:2] == oracle(text, stops)
    assert run(list(text), stops)[:2] == oracle(text, stops)


def test_stop_across_pieces_is_held_then_dropped():
    out, matched, emitted = run(["Hello", " wor", "ld<", "/an", "swer> tail"], ("</answer>",))
    assert (out, matched) == ("Hello world", "</answer>")
    assert emitted == ["Hello", " wor", "ld", "", ""]


def test_false_start_is_released():
    out, matched, emitted = run(["x <", "/b", "ad", "!"], ("</answer>",))
    assert (out, matched) == ("x </bad!", None)
    assert emitted == ["x ", "</b", "ad", "!", ""]


def test_earliest_completion_wins_over_earliest_start():
    assert run(["abcd"], ("abcd", "bc")) == ("a", "bc", ["a"])
    assert run(list("abcd"), ("abcd", "bc"))[:2] == ("a", "bc")


def test_no_stops_is_a_pass_through():
    assert run(["a", "b"], ()) == ("ab", None, ["a", "b", ""])
