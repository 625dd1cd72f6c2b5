"""Stop strings over streamed text: StopStrings cuts it where the slow, obvious rescan of everything
received cuts it, and never emits a piece of a stop string."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.serving.stop_strings import StopStrings

ALPHABET = "abAB é€\n"  # 1, 2 and 3 UTF-8 bytes: byte-level tokens split characters


def cut(parts: list[str], stops) -> str:
    """The slow, obvious answer: generation stops at the first piece after which the text received so far
    holds a stop string, and the output ends where the earliest one found then starts. (With stops "A" and
    "BAA", pieces "B", "A" stop at "A": the model never gets to write "BAA".)"""
    text = ""
    for part in parts:
        text += part
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[:min(hits)]
    return text


def pieces(draw, text: str) -> list[str]:
    bounds = sorted(draw(st.sets(st.integers(0, len(text)), max_size=len(text) + 1)) | {0, len(text)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(st.data(), st.text(ALPHABET, max_size=40), st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=3))
def test_stop_strings_cut_where_a_rescan_of_everything_cuts(data, text, stops):
    matcher = StopStrings(tuple(stops))
    emitted, parts = [], pieces(data.draw, text)
    for piece in parts:
        out = matcher.add(piece)
        emitted.append(out)
        # nothing emitted so far may contain a stop, nor end in text that a later piece turns into one
        assert not any(s in "".join(emitted) for s in stops)
        if matcher.stopped:
            break
    emitted.append(matcher.add("", final=True))
    assert "".join(emitted) == cut(parts, stops)
    assert matcher.stopped == any(s in text for s in stops)


def test_a_stop_split_across_pieces_is_held_back_then_dropped():
    matcher = StopStrings(("END", "\n\n"))
    assert matcher.add("foo E") == "foo "  # "E" may start END
    assert matcher.add("N") == ""
    assert matcher.add("Dbar") == "" and matcher.stopped
    assert matcher.add("more", final=True) == ""
    released = StopStrings(("END",))
    assert released.add("xEN") == "x" and released.add("", final=True) == "EN"  # the output ended: no stop
