"""Conversation keys and rendezvous ranking (no Ray needed): stable per conversation, spread across them."""

import random
from collections import Counter

from modelscope_llama2 import Llama2Tokenizer
from modelscope_llama2.constants import BOS_ID, DEMO_DIR, EOS_ID
from modelscope_llama2.prompts.chat_format import encode_dialog
from modelscope_llama2.serving.affinity import Placements, conversation_key, next_turn_ids, rank_order, turn_end_ids

SYSTEM = "You are a helpful, respectful and honest assistant. " * 20  # one long prompt every conversation shares


def encoder():
    return Llama2Tokenizer.from_pretrained(DEMO_DIR).sp_model.encode


def dialog(first, *rounds):
    """A system prompt, the first question, then (answer, question) rounds."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
    for answer, question in rounds:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    return messages


def key_of(messages, encode):
    return conversation_key(encode_dialog(messages, encode, BOS_ID, EOS_ID), turn_end_ids(encode))


def test_every_turn_of_a_conversation_has_one_key():
    encode = encoder()
    turns = [dialog("Where is Hangzhou?"),
             dialog("Where is Hangzhou?", ("In Zhejiang.", "And West Lake?")),
             dialog("Where is Hangzhou?", ("In Zhejiang.", "And West Lake?"), ("In Hangzhou.", "Thanks!"))]
    assert len({key_of(messages, encode) for messages in turns}) == 1
    # The same system prompt with another first question is another conversation.
    assert key_of(dialog("Where is Shanghai?"), encode) != key_of(turns[0], encode)


def test_turn_end_ids_are_what_the_chat_format_writes():
    encode = encoder()
    end = turn_end_ids(encode)
    ids = encode_dialog(dialog("Hi"), encode, BOS_ID, EOS_ID)
    assert tuple(ids[-len(end):]) == end and end == tuple(encode("x [/INST]")[len(encode("x")):])


def test_conversations_sharing_a_system_prompt_spread_over_replicas():
    encode = encoder()
    firsts = Counter(rank_order(key_of(dialog(f"Question number {i}?"), encode), [0, 1, 2, 3])[0]
                     for i in range(64))
    # 64 conversations over 4 ranks: every rank gets a fair share (16 expected).
    assert set(firsts) == {0, 1, 2, 3} and min(firsts.values()) >= 8


def test_a_departed_rank_moves_only_its_own_keys_and_gets_them_back():
    keys = [bytes([i]) * 32 for i in range(200)]
    before = {key: rank_order(key, [0, 1, 2])[0] for key in keys}
    without_1 = {key: rank_order(key, [0, 2])[0] for key in keys}
    assert all(without_1[key] == rank for key, rank in before.items() if rank != 1)
    assert {without_1[key] for key, rank in before.items() if rank == 1} == {0, 2}
    # The replica that takes rank 1 again takes exactly its keys back.
    assert {key: rank_order(key, [2, 0, 1])[0] for key in keys} == before


def test_a_prompt_without_a_user_turn_end_is_keyed_whole():
    assert conversation_key((1, 5, 6), (9, 9)) != conversation_key((1, 5, 7), (9, 9))
    assert conversation_key((1, 5, 6, 9, 9, 3), (9, 9)) == conversation_key((1, 5, 6, 9, 9, 4), (9, 9))


def test_next_turn_ids_are_how_the_next_prompt_goes_on_whatever_the_answer():
    """Answers of arbitrary pieces (what a random model samples), with stray spaces and newlines, after the
    first turn (system prompt folded in) and after a later one: the next prompt always starts with the
    prompt, then exactly these ids."""
    tokenizer = Llama2Tokenizer.from_pretrained(DEMO_DIR)
    encode, pieces = tokenizer.sp_model.encode, tokenizer.sp_model.get_piece_size()
    draw = random.Random(0)
    for index in range(200):
        answer = tokenizer.sp_model.decode([draw.randrange(3, pieces) for _ in range(draw.randint(1, 24))])
        answer = draw.choice(["", " ", "\n"]) + answer + draw.choice(["", " ", "\n\n"])
        asked = dialog("Where is Hangzhou?") if index % 2 else dialog("Where?", ("There.", "And West Lake?"))
        prompt = encode_dialog(asked, encode, BOS_ID, EOS_ID)
        following = encode_dialog(asked + [{"role": "assistant", "content": answer},
                                           {"role": "user", "content": "Thanks!"}], encode, BOS_ID, EOS_ID)
        ahead = next_turn_ids(answer, encode, BOS_ID, EOS_ID)
        assert following[:len(prompt) + len(ahead)] == prompt + ahead, repr(answer)
        assert len(following) > len(prompt) + len(ahead)  # the new question is left to compute


def test_conversations_start_on_the_least_loaded_replica_and_stay():
    placements = Placements(imbalance=4)
    active = Counter()

    def start(key):
        order = rank_order(key, ["a", "b"])
        home = placements.choose(key, order, lambda replica: active[replica])
        active[home] += 1
        return home

    keys = [bytes([i]) * 32 for i in range(16)]
    homes = {key: start(key) for key in keys}
    # Started while the others run: 8 each, whatever the hash says (it splits these 16 keys unevenly).
    assert Counter(homes.values()) == {"a": 8, "b": 8}
    assert Counter(rank_order(key, ["a", "b"])[0] for key in keys) != {"a": 8, "b": 8}
    # Later turns go back to where their conversation is, under the same load.
    assert all(placements.choose(key, ["a", "b"], lambda replica: active[replica]) == home
               for key, home in homes.items())


def test_conversations_starting_on_idle_replicas_spread_evenly():
    placements = Placements(imbalance=4)
    idle = {"a": 0, "b": 0, "c": 0, "d": 0}.get
    keys = [bytes([i]) * 32 for i in range(16)]
    homes = [placements.choose(key, rank_order(key, list("abcd")), idle) for key in keys]
    assert Counter(homes) == {"a": 4, "b": 4, "c": 4, "d": 4}
    assert Counter(rank_order(key, list("abcd"))[0] for key in keys) != Counter(homes)  # the hash alone: uneven


def test_placements_forget_the_least_recently_used_conversation_first():
    placements = Placements(imbalance=4, capacity=2)
    idle = {"a": 0, "b": 0}.get
    busy_a = {"a": 1, "b": 0}.get
    assert placements.choose(b"one", ["a", "b"], idle) == "a"
    assert placements.choose(b"two", ["b", "a"], idle) == "b"
    assert placements.choose(b"one", ["b", "a"], busy_a) == "a"  # remembered, and now the most recent
    assert placements.choose(b"three", ["a", "b"], busy_a) == "b"  # "two" is forgotten
    assert placements.choose(b"two", ["a", "b"], busy_a) == "b"  # new again: the least loaded
    # Forgotten when "two" came back, so new again: both idle, "a" holds none of the remembered two.
    assert placements.choose(b"one", ["b", "a"], idle) == "a"
