"""model.preprocessor: text, chat pairs and conversations -> batches; fit / evaluate / predict on text."""

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2.training.preprocessor import Gemma2CausalLMPreprocessor

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): the preprocessor is the
# tokenizer and numpy; only the fit / evaluate / predict test runs a backend.

TEXTS = ["The cat sat on the mat.", "A dog ran in the park and barked at the birds."]
PAIRS = [("What is two plus two?", "Four."), ("Name a colour.", "Blue, like the sky.")]


@pytest.fixture(scope="module")
def demo():
    return keras_gemma2.from_preset("gemma2_demo")


@pytest.fixture
def preprocessor(demo):
    return Gemma2CausalLMPreprocessor(demo.tokenizer, sequence_length=24, max_sequence_length=512)


@pytest.mark.backend_agnostic
def test_plain_texts_become_inputs_next_token_labels_and_weights(demo, preprocessor):
    x, labels, weights = preprocessor(TEXTS)
    for row, text in enumerate(TEXTS):
        ids = demo.tokenizer.tokenize(text, add_bos=True, add_eos=True)[:25]  # truncated to L + 1
        n = len(ids)
        np.testing.assert_array_equal(x["token_ids"][row, : n - 1], ids[:-1])
        np.testing.assert_array_equal(labels[row, : n - 1], ids[1:])
        assert x["padding_mask"][row].tolist() == [1] * min(n, 24) + [0] * (24 - min(n, 24))
        assert weights[row].tolist() == [1.0] * (n - 1) + [0.0] * (24 - (n - 1))  # padding weighs 0
    assert x["token_ids"].shape == labels.shape == weights.shape == (2, 24)
    assert labels[1, -1] != demo.tokenizer.eos_token_id  # the long text was cut, not its end kept


@pytest.mark.backend_agnostic
def test_a_chat_pair_weighs_only_the_models_turn(demo, preprocessor):
    """Position by position: the user's turn and the model's opening weigh 0, its reply and
    <end_of_turn> weigh 1, the way instruction tuning trains."""
    preprocessor.sequence_length = 64
    prompt, response = PAIRS[1]
    x, labels, weights = preprocessor([PAIRS[1]])
    tokenizer = demo.tokenizer
    context = tokenizer.tokenize(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]),
                                 add_bos=True)
    full = tokenizer.tokenize(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "model", "content": response}],
        add_generation_prompt=False), add_bos=True)
    assert full[: len(context)] == context  # what generate sees before the reply
    n = len(full)
    np.testing.assert_array_equal(x["token_ids"][0, : n - 1], full[:-1])
    np.testing.assert_array_equal(labels[0, : n - 1], full[1:])
    # Label t is token t + 1: the reply starts at token len(context).
    expected = [0.0] * (len(context) - 1) + [1.0] * (n - len(context)) + [0.0] * (64 - (n - 1))
    assert weights[0].tolist() == expected
    reply = [full[t + 1] for t in range(n - 1) if weights[0, t]]
    assert tokenizer.end_of_turn_id in reply and tokenizer.start_of_turn_id not in reply
    assert tokenizer.detokenize(reply).startswith(response)


@pytest.mark.backend_agnostic
def test_a_conversation_weighs_every_model_turn_and_no_user_turn(demo, preprocessor):
    preprocessor.sequence_length = 128
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "model", "content": "Goodbye."},
    ]
    x, labels, weights = preprocessor([messages])
    targets = labels[0][weights[0] > 0].tolist()
    text = demo.tokenizer.detokenize(targets, skip_special=False)
    assert text == "Hello.<end_of_turn>\nGoodbye.<end_of_turn>\n"


@pytest.mark.backend_agnostic
def test_keras_hubs_prompts_and_responses_are_concatenated_without_a_template(demo, preprocessor):
    x, labels, weights = preprocessor({"prompts": ["Q: 2+2?\nA:"], "responses": [" 4"]})
    targets = demo.tokenizer.detokenize(labels[0][weights[0] > 0].tolist(), skip_special=False)
    assert targets == " 4<eos>"
    assert demo.tokenizer.start_of_turn_id not in x["token_ids"][0]


@pytest.mark.backend_agnostic
def test_packing_fills_whole_windows(demo, preprocessor):
    preprocessor.pack, preprocessor.sequence_length = True, 8
    x, labels, weights = preprocessor(TEXTS * 3)
    stream = np.concatenate([demo.tokenizer.tokenize(t, add_bos=True, add_eos=True) for t in TEXTS * 3])
    assert x["padding_mask"][:-1].all()  # every window but the last is full
    np.testing.assert_array_equal(x["token_ids"][0], stream[:8])
    np.testing.assert_array_equal(x["token_ids"][1], stream[9:17])


@pytest.mark.parametrize("data, message", [
    (["a", 3], "Mixed batch: item 0 is a string but item 1 is an int"),
    (["fine", "  "], "Text 1 is empty"),
    ([("Question?", " ")], "Chat pair 0 has an empty response"),
    ([[{"role": "user", "content": "Hi"}]], "Conversation 0 has no non-empty model turn"),
    ({"prompts": ["a", "b"], "responses": ["c"]}, "2 prompts but 1 responses"),
    (np.array([], dtype=str), "x is an empty ndarray"),
    # Keras' own KeyError, a numpy UFuncTypeError and a raw UnicodeDecodeError before:
    ([], "x is an empty list: there is nothing to train on"),
    ([("q?", 5)], r"Item 0 is a tuple of 2 .*a chat pair is exactly two strings"),
    ([("q?", "a", "b")], r"Item 0 is a tuple of 3 .*a chat pair is exactly two strings"),
    (np.array([b"\xff\xfe def", b"ok"]), r"Text 0 is bytes that are not UTF-8 \(byte 1 is 0xff\)"),
])
@pytest.mark.backend_agnostic
def test_bad_text_is_refused_before_the_first_step(demo, data, message):
    weights = [w.copy() for w in demo.get_weights()]
    demo.compile(optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=message):
        demo.fit(data, epochs=1, verbose=0)
    for before, after in zip(weights, demo.get_weights()):
        np.testing.assert_array_equal(before, after)


@pytest.mark.backend_agnostic
def test_sequence_length_beyond_the_context_is_refused(demo):
    with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
        demo.preprocessor.sequence_length = 513
    assert demo.preprocessor.sequence_length == 512  # min(1024, the demo's context)


@pytest.mark.backend_agnostic
def test_text_with_labels_is_refused(demo):
    with pytest.raises(ValueError, match="carry their own labels"):
        demo.fit(TEXTS, np.zeros((2, 5), "int32"), verbose=0)


@pytest.mark.parametrize("kind", ["list", "numpy", "tf.data", "pairs", "tf.data pairs"])
def test_fit_evaluate_and_predict_take_text(kind):
    tf = pytest.importorskip("tensorflow")
    model = keras_gemma2.from_preset("gemma2_demo")
    model.preprocessor.sequence_length = 24
    data = {
        "list": TEXTS,
        "numpy": np.array(TEXTS),
        "tf.data": tf.data.Dataset.from_tensor_slices(TEXTS).batch(2),
        "pairs": PAIRS,
        "tf.data pairs": tf.data.Dataset.from_tensor_slices(tuple(map(list, zip(*PAIRS)))).batch(2),
    }[kind]
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(data, epochs=4, batch_size=2, verbose=0).history["loss"]
    assert history[-1] < history[0]
    loss = model.evaluate(data, verbose=0)[0]
    assert np.isfinite(loss)
    logits = model.predict(data, verbose=0)
    assert logits.shape == (2, 24, model.config.vocabulary_size)


@pytest.mark.backend_agnostic
def test_an_unbatched_text_dataset_is_refused_with_the_fix():
    tf = pytest.importorskip("tensorflow")
    model = keras_gemma2.from_preset("gemma2_demo")
    model.compile()
    with pytest.raises(ValueError, match=r"batch it first \(dataset.batch\(8\)\)"):
        model.fit(tf.data.Dataset.from_tensor_slices(TEXTS), verbose=0)
    mixed = tf.data.Dataset.from_tensor_slices((TEXTS, [1, 2])).batch(2)
    with pytest.raises(ValueError, match="mix strings with other values"):
        model.fit(mixed, verbose=0)
