"""start_chat(): a conversation keeps its KV cache, and each turn is what generate gives on its transcript."""

import threading

import keras
import pytest

from helpers import TINY, backend_traces, randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Tokenizer, backend

MESSAGES = ["Hello", "And then?", "ok, why", "What is 2+2?", "go on"]


@pytest.fixture(scope="module")
def model(sentencepiece_path):
    """The tiny architecture (window 4, so every transcript is far past it) with a 512-token context."""
    config = TINY.replace(max_sequence_length=512)
    return randomize_weights(
        Gemma2CausalLM(Gemma2Backbone(config), tokenizer=Gemma2Tokenizer(sentencepiece_path)), seed=3
    )


def fresh_reply(model, turn, **kwargs):
    """generate over the turn's transcript ids (not re-tokenized text), from an empty cache."""
    return model.generate([turn.prompt_ids.tolist()], **kwargs)[0].tolist()


def user_turn_ids(tokenizer, message):
    """What a later turn adds after the previous reply: <end_of_turn>, then the user's turn."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}])
    return [tokenizer.end_of_turn_id] + tokenizer.tokenize("\n" + text, add_bos=False)


def feeding_spy(model, monkeypatch):
    """The number of tokens each turn feeds to the cache (the `length` given to `extend`)."""
    fed, continuation = [], model.generator.continuation

    def spying(*args):
        extend, decode = continuation(*args)

        def counted(caches, chunk, length, *rest):
            fed.append(int(length))
            return extend(caches, chunk, length, *rest)

        return counted, decode

    monkeypatch.setattr(model.generator, "continuation", spying)
    return fed


def test_each_turn_prefills_only_its_message_and_replies_as_generate_would(model, monkeypatch):
    tokenizer = model.tokenizer
    fed = feeding_spy(model, monkeypatch)
    conversation = model.start_chat(max_new_tokens=7, stop_token_ids=())
    for k, message in enumerate(MESSAGES):
        before, cached = conversation.token_ids.tolist(), conversation.cached_tokens
        reply = conversation.send(message, return_logprobs=True)
        turn = conversation.turns[-1]
        prompt = turn.prompt_ids.tolist()
        if k == 0:
            assert prompt == tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": message}]))
        else:
            # The transcript so far, then this turn's ids: the earlier reply ids are the sampled ones.
            assert prompt == before + user_turn_ids(tokenizer, message)
            # The cache held all of it but the last reply token (sampled, never fed): the turn
            # feeds that token and its own ids, never the earlier transcript.
            assert cached == len(before) - 1
        assert fed[-1] == len(prompt) - cached
        assert reply.token_ids[0].tolist() == turn.reply_ids.tolist() == fresh_reply(
            model, turn, max_new_tokens=7, stop_token_ids=()
        )
        assert reply.text[0] == turn.reply
    assert len(conversation.token_ids) > 4 * model.config.sliding_window_size
    assert [m["role"] for m in conversation.messages] == ["user", "model"] * len(MESSAGES)
    assert conversation.messages[-2:] == [
        {"role": "user", "content": MESSAGES[-1]}, {"role": "model", "content": conversation.turns[-1].reply}
    ]


def test_stop_tokens_and_stop_strings_shorten_the_transcript(model):
    # Stop at a token the free-running reply would emit, then at a string it would write.
    free = model.start_chat(max_new_tokens=8, stop_token_ids=()).send("Hello", return_logprobs=True)
    ids = free.token_ids[0].tolist()
    stop_id = next(i for i in ids[2:] if i not in ids[:2])
    conversation = model.start_chat(max_new_tokens=8, stop_token_ids=[stop_id])
    first = conversation.send("Hello", return_logprobs=True).token_ids[0].tolist()
    assert first == ids[: ids.index(stop_id)]
    # The stop token is not in the transcript: the turn closes with <end_of_turn>.
    assert conversation.token_ids.tolist()[-len(first) - 1 :] == conversation.turns[0].prompt_ids.tolist()[-1:] + first
    second = conversation.send("And then?")
    assert conversation.turns[1].prompt_ids.tolist()[len(conversation.turns[0].prompt_ids) + len(first)] == (
        model.tokenizer.end_of_turn_id
    )
    assert conversation.turns[1].reply_ids.tolist() == fresh_reply(
        model, conversation.turns[1], max_new_tokens=8, stop_token_ids=[stop_id]
    )
    assert second == conversation.turns[1].reply

    detokenize = model.tokenizer.detokenize
    # A later token whose text first appears there: the reply is cut just before it.
    j = next(j for j in range(2, len(ids)) if detokenize(ids[j : j + 1]) and detokenize(ids[j : j + 1])
             not in detokenize(ids[: j + 1])[:-1])
    stop_string = detokenize(ids[j : j + 1])
    conversation = model.start_chat(max_new_tokens=8, stop_token_ids=(), stop_strings=[stop_string])
    cut = conversation.send("Hello")
    assert cut == detokenize(ids[:j]) and conversation.turns[0].reply_ids.tolist() == ids[:j]
    assert conversation.token_ids.tolist()[-j - 1 :] == conversation.turns[0].prompt_ids.tolist()[-1:] + ids[:j]
    # Tokens written into the cache past the cut are dropped: the next turn is still exact.
    conversation.send("And then?")
    assert conversation.turns[1].reply_ids.tolist() == fresh_reply(
        model, conversation.turns[1], max_new_tokens=8, stop_token_ids=(), stop_strings=[stop_string]
    )


def test_streamed_turns_equal_whole_turns_and_a_stream_left_early_keeps_its_tokens(model):
    whole = model.start_chat(max_new_tokens=6, stop_token_ids=())
    streamed = model.start_chat(max_new_tokens=6, stop_token_ids=())
    for message in MESSAGES[:3]:
        text = whole.send(message)
        pieces = list(streamed.send(message, stream=True))
        assert "".join(pieces) == text and len(pieces) > 1
    assert streamed.token_ids.tolist() == whole.token_ids.tolist()
    seen = []  # a callback's return value is not the text
    assert streamed.send("more", stream=lambda piece: seen.append(piece) or len(piece)) == whole.send("more")
    assert "".join(seen) == whole.turns[-1].reply

    conversation = model.start_chat(max_new_tokens=6, stop_token_ids=())
    pieces = conversation.send("Hello", stream=True)
    next(pieces)
    conversation.send("And then?")  # closes the first stream where it was read
    first = conversation.turns[0].reply_ids.tolist()
    assert 1 <= len(first) < 6
    assert first == fresh_reply(model, conversation.turns[0], max_new_tokens=len(first), stop_token_ids=())
    assert conversation.turns[1].reply_ids.tolist() == fresh_reply(
        model, conversation.turns[1], max_new_tokens=6, stop_token_ids=()
    )


def test_sampled_turns_follow_generate_with_the_turns_seed(model):
    conversation = model.start_chat(max_new_tokens=6, stop_token_ids=(), sampler="top_k", top_k=20, seed=11)
    replies = [conversation.send(message, return_logprobs=True) for message in MESSAGES[:3]]
    for k, (reply, turn) in enumerate(zip(replies, conversation.turns)):
        expected = fresh_reply(model, turn, max_new_tokens=6, stop_token_ids=(), sampler="top_k", top_k=20,
                               seed=11 + k)
        assert reply.token_ids[0].tolist() == expected
    # Sampling left the greedy path, and each turn's seed is its own (seed + turn index).
    greedy = [fresh_reply(model, turn, max_new_tokens=6, stop_token_ids=()) for turn in conversation.turns]
    assert any(reply.token_ids[0].tolist() != path for reply, path in zip(replies, greedy))
    first_seed = [fresh_reply(model, turn, max_new_tokens=6, stop_token_ids=(), sampler="top_k", top_k=20,
                              seed=11) for turn in conversation.turns[1:]]
    assert any(reply.token_ids[0].tolist() != same for reply, same in zip(replies[1:], first_seed))


def test_outgrowing_the_context_is_refused_untouched_or_drops_the_oldest_turns(model):
    tokenizer = model.tokenizer
    small = Gemma2CausalLM(Gemma2Backbone(model.config.replace(max_sequence_length=128)), tokenizer=tokenizer)
    small.set_weights(model.get_weights())

    conversation = small.start_chat(max_new_tokens=6, stop_token_ids=())
    while len(conversation.token_ids) + 60 < 128:
        conversation.send(MESSAGES[len(conversation.turns) % len(MESSAGES)])
    ids, turns = conversation.token_ids.tolist(), list(conversation.turns)
    with pytest.raises(ValueError, match="does not fit.*on_overflow='drop_oldest'"):
        conversation.send("a longer message " * 6)
    assert conversation.token_ids.tolist() == ids and conversation.turns == turns
    conversation.send("ok")  # a turn that fits still works, and still uses the cache
    assert conversation.turns[-1].prompt_ids.tolist()[: len(ids)] == ids
    assert conversation.turns[-1].reply_ids.tolist() == fresh_reply(
        small, conversation.turns[-1], max_new_tokens=6, stop_token_ids=()
    )

    dropping = small.start_chat(max_new_tokens=6, stop_token_ids=(), on_overflow="drop_oldest")
    for k in range(12):
        dropping.send(MESSAGES[k % len(MESSAGES)])
        turn = dropping.turns[-1]
        assert len(turn.prompt_ids) + 6 <= 128
        assert turn.reply_ids.tolist() == fresh_reply(small, turn, max_new_tokens=6, stop_token_ids=())
    assert dropping.dropped_turns > 0
    prompt = dropping.turns[-1].prompt_ids.tolist()
    start_of_user = tokenizer.tokenize("<start_of_turn>user", add_bos=False)
    # BOS, then whole turns only: the oldest were dropped, the latest kept.
    assert prompt[0] == tokenizer.bos_token_id and prompt[1 : 1 + len(start_of_user)] == start_of_user
    assert len(dropping.token_ids) < sum(len(user_turn_ids(tokenizer, MESSAGES[k % 5])) for k in range(12))
    with pytest.raises(ValueError, match="alone are too long"):
        dropping.send("word " * 200)


def test_an_error_mid_reply_keeps_the_transcript_and_the_next_turn_prefills_it(model, monkeypatch):
    conversation = model.start_chat(max_new_tokens=6, stop_token_ids=())
    conversation.send("Hello")
    generator = model.generator
    continuation = generator.continuation

    def failing(*args):
        extend, _ = continuation(*args)

        def decode(state, seed, stop_at):
            raise KeyboardInterrupt

        return extend, decode

    monkeypatch.setattr(generator, "continuation", failing)
    ids, turns = conversation.token_ids.tolist(), list(conversation.turns)
    with pytest.raises(KeyboardInterrupt):
        conversation.send("And then?")
    # A failed call leaves the transcript as it was; the cache may have been donated, so the next
    # turn prefills the transcript again.
    assert conversation.token_ids.tolist() == ids and conversation.turns == turns
    assert conversation.cached_tokens == 0
    pieces = conversation.send("And then?", stream=True)
    first_piece = next(pieces)
    with pytest.raises(KeyboardInterrupt):
        next(pieces)
    # A stream keeps what it delivered.
    assert len(conversation.turns) == 2 and conversation.turns[-1].reply == first_piece
    assert len(conversation.turns[-1].reply_ids) == 1 and conversation.cached_tokens == 0
    monkeypatch.undo()
    conversation.send("ok")
    assert conversation.turns[-1].reply_ids.tolist() == fresh_reply(
        model, conversation.turns[-1], max_new_tokens=6, stop_token_ids=()
    )


def test_history_reset_and_programs_reused_across_conversations(model):
    tokenizer = model.tokenizer
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello!"},
    ]
    conversation = model.start_chat(history, max_new_tokens=5, stop_token_ids=())
    conversation.send("Why?")
    expected = tokenizer(tokenizer.apply_chat_template(history + [{"role": "user", "content": "Why?"}]))
    assert conversation.turns[0].prompt_ids.tolist() == expected
    assert conversation.messages[:3] == history
    conversation.reset()
    assert conversation.token_ids.tolist() == [] and conversation.turns == []
    assert conversation.messages == history

    def converse(messages, budgets):
        chat = model.start_chat(stop_token_ids=())
        for message, budget in zip(messages, budgets):
            chat.send(message, max_new_tokens=budget)

    if not backend.compiles():
        return  # PyTorch runs generation eagerly: there is nothing to count
    fresh = Gemma2CausalLM(Gemma2Backbone(model.config), tokenizer=tokenizer)  # no programs yet
    fresh.set_weights(model.get_weights())
    model = fresh
    converse(MESSAGES, [6, 5, 7, 4, 6])
    programs = len(model.generator._functions)  # (chunk bucket, cache bucket) pairs met
    first = model.generator.compilations
    # Each program traced once (the library's count and the backend's own agree), and turns
    # shared programs: fewer than one extend and one decode per turn.
    assert first == backend_traces(model.generator) == programs < 2 * len(MESSAGES)
    # Other messages of like lengths and other budgets: the same buckets, nothing new to compile.
    converse(["Hi there", "And now?", "ok, how", "What is 3+3?", "go on!"], [5, 7, 6, 6, 3])
    assert model.generator.compilations == backend_traces(model.generator) == first
    assert len(model.generator._functions) == programs


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's XLA bridge only")
def test_tensorflow_programs_slice_only_at_constant_starts(model, monkeypatch):
    """TensorFlow's XLA bridge compiles a new program for each value of a tf.slice start
    that comes from an input: a conversation's host-driven decode step (a bfloat16 or
    float16 model at batch 1) read its window at the token's index and recompiled every
    token (~1 s each). Every Slice in its programs starts at constants; the rest slice
    dynamically."""
    made, compile_function = [], backend.compile_function

    def recording(*args, **kwargs):
        made.append(compile_function(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(backend, "compile_function", recording)
    monkeypatch.setattr(backend, "steps_from_host", lambda model, batch_size: True)
    monkeypatch.setattr(model, "_generator", None, raising=False)  # programs traced afresh, under the spy
    conversation = model.start_chat(max_new_tokens=6, stop_token_ids=())
    for message in MESSAGES[:2]:
        conversation.send(message)
    dynamic = 0
    for function in made:
        for concrete in function._list_all_concrete_functions():
            for op in concrete.graph.get_operations():
                if op.type == "Slice":
                    assert op.inputs[1].op.type == "Const", f"{op.name} starts at {op.inputs[1].op.type}"
                dynamic += op.type == "XlaDynamicSlice"
    assert dynamic > 0


def test_a_turn_sent_while_another_threads_turn_runs_is_refused_and_the_transcript_stays_true(model, monkeypatch):
    """Two threads sending on one conversation both returned, and the transcript recorded
    two turns with one turn's ids (or no <end_of_turn> between them)."""
    inside, attempted, refused = threading.Event(), threading.Event(), []
    continuation = model.generator.continuation

    def held(*args):  # the first turn waits inside its prefill until the second send was tried
        extend, decode = continuation(*args)

        def waiting(*inputs):
            inside.set()
            assert attempted.wait(60)
            return extend(*inputs)

        return waiting, decode

    monkeypatch.setattr(model.generator, "continuation", held)
    conversation = model.start_chat(max_new_tokens=5, stop_token_ids=())

    def second():
        assert inside.wait(60)
        for attempt in (lambda: conversation.send("And then?"), lambda: conversation.token_ids,
                        conversation.reset):
            try:
                attempt()
            except RuntimeError as error:
                refused.append(str(error))
        attempted.set()

    other = threading.Thread(target=second)
    other.start()
    reply = conversation.send("Hello")
    other.join(60)
    assert len(refused) == 3 and all("busy with a turn in another thread" in e for e in refused)
    monkeypatch.undo()
    alone = model.start_chat(max_new_tokens=5, stop_token_ids=())
    assert reply == alone.send("Hello")
    assert conversation.token_ids.tolist() == alone.token_ids.tolist() and len(conversation.turns) == 1

    # A stream being read in one thread: a send from another is refused while a step runs.
    stream = conversation.send("And then?", stream=True)
    inside.clear()
    attempted.clear()
    monkeypatch.setattr(model.generator, "continuation", held)
    threading.Thread(target=lambda: (inside.wait(60), refused.append(
        pytest.raises(RuntimeError, conversation.send, "x")), attempted.set())).start()
    "".join(stream)
    assert len(refused) == 4 and len(conversation.turns) == 2
