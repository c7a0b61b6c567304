"""StreamingDetokenizer against the independent reference: one ``tokenizer.decode`` of all the ids.

Random id sequences lean on byte-fallback tokens (multi-byte characters cut
across tokens, invalid byte runs) and on pieces with and without a leading
``▁``; stop strings are drawn from the decoded text so they span tokens.
"""

import random

import pytest

from modelscope_llama2.decoding import StreamingDetokenizer

REPLACEMENT = "\ufffd"
TEXTS = ["Where is the capital of Zhejiang?", "浙江的省会是杭州。", "Emoji 😀🎉👍🏽 and 🐉", "  spaces  and\ttabs\n",
         "3.14159 and 2023-07-18", "日本語のテキスト", "West Lake, Lingyin Temple", "«quotes» “curly” ©®™"]


def stream(detok, ids, rng=None):
    """Feed ``ids`` in random-sized chunks (one by one without ``rng``); return every piece returned."""
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3) if rng else 1
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    return pieces + [detok.finish()]


def byte_ids(tokenizer, text):
    """``text`` spelt entirely in byte-fallback tokens (<0xNN>), as a model may generate it."""
    return [tokenizer.sp_model.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


def random_ids(tokenizer, rng):
    """A mix of encoded text, byte-spelt text, stray bytes and random pieces."""
    ids = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        text = rng.choice(TEXTS)
        if kind < 0.35:
            ids += tokenizer.encode(text)
        elif kind < 0.6:
            ids += byte_ids(tokenizer, text)
        elif kind < 0.75:  # a character cut short, then something else
            ids += byte_ids(tokenizer, text)[: rng.randint(1, 3)]
        else:
            ids += [rng.randrange(3, tokenizer.vocab_size) for _ in range(rng.randint(1, 8))]
    return ids


@pytest.mark.parametrize("chunks", ["one id at a time", "random chunks"])
def test_streamed_text_is_the_full_decode(tokenizer, chunks):
    for seed in range(300):
        rng = random.Random(seed)
        ids = random_ids(tokenizer, rng)
        pieces = stream(StreamingDetokenizer(tokenizer), ids, rng if chunks == "random chunks" else None)
        # An incomplete last character is dropped, as generation can end inside one.
        assert "".join(pieces) == tokenizer.decode(ids).rstrip(REPLACEMENT), (seed, ids)
        # Text is shown only once it settles: no piece but the last ends in a broken character.
        assert not any(piece.endswith(REPLACEMENT) for piece in pieces[:-1]), (seed, ids)


def test_prefix_ids_keep_the_continuations_leading_space(tokenizer):
    for seed in range(200):
        rng = random.Random(seed)
        prompt = tokenizer.encode(rng.choice(TEXTS) + " " + rng.choice(TEXTS))
        ids = random_ids(tokenizer, rng)
        pieces = stream(StreamingDetokenizer(tokenizer, prefix_ids=prompt), ids, rng)
        full = tokenizer.decode(prompt + ids).rstrip(REPLACEMENT)
        assert "".join(pieces) == full[len(tokenizer.decode(prompt)):], (seed, prompt, ids)


def test_a_completions_first_word_keeps_its_space(tokenizer):
    ids = tokenizer.encode("West the capital")
    split = tokenizer.sp_model.encode("West the capital", out_type=str).index("▁the")
    assert tokenizer.decode(ids[split:]) == "the capital"  # sentencepiece drops a sequence's leading space
    detok = StreamingDetokenizer(tokenizer, prefix_ids=ids[:split])
    assert "".join(stream(detok, ids[split:])) == " the capital"
    assert detok.token_count == len(ids)


def test_stop_strings_across_tokens_cut_at_the_first_occurrence(tokenizer):
    for seed in range(300):
        rng = random.Random(seed)
        ids = tokenizer.encode(" ".join(rng.choice(TEXTS) for _ in range(4)))
        if seed % 3 == 0:
            ids = byte_ids(tokenizer, tokenizer.decode(ids))
        full = tokenizer.decode(ids)
        start = rng.randrange(len(full) - 1)
        stops = [full[start:start + rng.randint(1, 6)], "never in the text"]
        detok = StreamingDetokenizer(tokenizer, stop=stops)
        pieces = stream(detok, ids, rng)
        cut = min(i for i in (full.find(stop) for stop in stops) if i >= 0)
        assert "".join(pieces) == full[:cut] == detok.text and detok.stopped, (seed, stops)
        # No stop ever shows, even in part-way text.
        shown = ""
        for piece in pieces:
            shown += piece
            assert not any(stop in shown for stop in stops), (seed, stops)


def shown_while_streaming(text, stop):
    """What may show of ``text`` so far: all but a tail that could be the start of ``stop``."""
    held = max((n for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
    return text[: len(text) - held]


def test_a_possible_stop_is_held_back_until_it_is_not_one(tokenizer):
    stop = "Lake Tai"
    ids = tokenizer.encode("West Lake Temple")
    detok = StreamingDetokenizer(tokenizer, stop=[stop])
    shown = ""
    for n in range(1, len(ids) + 1):
        shown += detok.add(ids[n - 1:n])
        text = tokenizer.decode(ids[:n])
        assert shown == shown_while_streaming(text, stop), text
        if text == "West Lake T":
            assert shown == "West "
    assert shown + detok.finish() == "West Lake Temple" and not detok.stopped
    detok = StreamingDetokenizer(tokenizer, stop=[stop])
    assert detok.add(tokenizer.encode("West Lake T")) == "West "
    assert detok.finish() == "Lake T"  # generation ended: a held-back tail is shown whole


def test_multi_byte_characters_show_whole(tokenizer):
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in byte_ids(tokenizer, "龍🐉")]
    assert pieces == ["", "", "龍", "", "", "", "🐉"]
    assert detok.finish() == ""


def test_nothing_after_a_stop(tokenizer):
    detok = StreamingDetokenizer(tokenizer, stop=[","])
    assert detok.add(tokenizer.encode("Yes, and more")) == "Yes"
    assert detok.stopped and detok.add(tokenizer.encode(" more")) == "" and detok.finish() == ""


class CountingTokenizer:
    """The real tokenizer, recording how many ids each ``decode`` call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids)


def test_work_per_token_does_not_grow_with_the_answer(tokenizer):
    # 2,000 ids of text and byte-spelt characters: each add() decodes a short window, not all ids so far.
    ids = [i for text in TEXTS * 25 for i in tokenizer.encode(text) + byte_ids(tokenizer, "龍🐉")][:2000]
    counting = CountingTokenizer(tokenizer)
    pieces = stream(StreamingDetokenizer(counting), ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) == 2000 and max(counting.lengths) <= 12


def test_stop_matching_agrees_with_the_plain_search_on_repetitive_text():
    # Small alphabets make overlapping partial matches (the KMP fallbacks) common.
    from modelscope_llama2.decoding import _StopMatcher

    for seed in range(500):
        rng = random.Random(seed)
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 7)))
        matcher, text, cut = _StopMatcher(stop), "", None
        while cut is None and len(text) < 40:
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
            cut = matcher.feed(piece, len(text))
            text += piece
            if cut is None:
                assert stop not in text, (seed, stop, text)
                held = max((n for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
                assert matcher.matched == held, (seed, stop, text)
        if cut is not None:
            assert cut == text.find(stop), (seed, stop, text)


class CountingStr(str):
    """A stop string that counts the characters read from it."""

    reads = 0

    def __getitem__(self, index):
        CountingStr.reads += 1
        return str.__getitem__(self, index)


def test_stop_matching_per_token_does_not_grow_with_the_stop_length(tokenizer):
    # Finding 1 of issue 19: 200 KB stop strings froze the server (every prefix tried on every token).
    ids = tokenizer.encode(" ".join(TEXTS * 10))[:300]
    for length in (1_000, 100_000):
        detok = StreamingDetokenizer(tokenizer, stop=[CountingStr("West Lake, Lingyin X" + "y" * length)])
        CountingStr.reads = 0
        text = "".join(stream(detok, ids))
        assert text == tokenizer.decode(ids) and not detok.stopped
        # About two reads a character of text, whatever the stop's length.
        assert CountingStr.reads <= 3 * len(text), (length, CountingStr.reads)
