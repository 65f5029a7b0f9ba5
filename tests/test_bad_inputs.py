"""Bad arguments to the library API: one table of calls, each a clear error naming its argument.

Every row runs a call that must fail, the exception type it must raise, and
substrings the message must hold (the argument's name first). Every row also
checks that the rejected call left the model as it was (weights, trainable
flags, no adapters, no quantization, nothing compiled) and left nothing
half-written on disk. The tests after the table pin down what a corrected
argument now does (a str stop string is one string, and so on).
"""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import logits_of, randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config, Gemma2Tokenizer
from keras_gemma2.model.lora import lora_layers
from keras_gemma2.model.quantization import quantization_modes
from keras_gemma2.generation.samplers import BeamSearch, Sampler

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): the table's arguments are refused
# before any tensor op, and preset parsing and file permissions are host-side.

TINY = Gemma2Config.from_preset("gemma2_tiny_test")  # vocabulary 128, context 64, widths 32
PROMPT = "def add(a, b):"
MESSAGES = [{"role": "user", "content": "Hello"}]
KERASHUB_CONFIG = {
    "module": "keras_hub.src.models.gemma.gemma_backbone",
    "class_name": "GemmaBackbone",
    "registered_name": "keras_hub>GemmaBackbone",
    "config": {
        "vocabulary_size": 128, "num_layers": 2, "num_query_heads": 4, "num_key_value_heads": 2,
        "hidden_dim": 32, "intermediate_dim": 96, "head_dim": 16, "query_head_dim_normalize": True,
        "use_post_ffw_norm": True, "use_post_attention_norm": True, "attention_logit_soft_cap": 50.0,
        "final_logit_soft_cap": 30.0, "use_sliding_window_attention": True, "sliding_window_size": 4,
        "dtype": "float32",
    },
}


@pytest.fixture(scope="module")
def models(sentencepiece_path):
    """(a tiny model with the tiny tokenizer, the same weights without a tokenizer)."""
    model = Gemma2CausalLM(Gemma2Backbone(TINY), tokenizer=Gemma2Tokenizer(sentencepiece_path))
    randomize_weights(model)
    bare = Gemma2CausalLM(Gemma2Backbone(TINY))
    bare.set_weights(model.get_weights())
    return model, bare


@pytest.fixture(scope="module")
def saved_preset(models, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("saved") / "tiny")
    models[0].save_to_preset(directory)
    return directory


class Context:
    """What a row's call may use: the models, a private copy of a saved preset, a scratch folder."""

    def __init__(self, models, saved_preset, tmp_path):
        self.model, self.bare = models
        self.saved_preset = saved_preset
        self.tmp = str(tmp_path)
        self.out = os.path.join(self.tmp, "out")  # where save rows write (must stay absent)

    # Drafts a target cannot use (speculative decoding rows).
    @property
    def other_vocabulary(self):
        return Gemma2CausalLM(Gemma2Backbone(TINY.replace(vocabulary_size=96)))

    @property
    def other_tokenizer(self):
        from helpers import train_test_sentencepiece

        path = train_test_sentencepiece(os.path.join(self.tmp, "other-tokenizer"), split_digits=False)
        return Gemma2CausalLM(Gemma2Backbone(TINY), tokenizer=Gemma2Tokenizer(path))

    @property
    def short(self):
        return Gemma2CausalLM(Gemma2Backbone(TINY.replace(max_sequence_length=32, sliding_window_size=4)))

    def preset(self):
        copy = os.path.join(self.tmp, "preset")
        shutil.copytree(self.saved_preset, copy)
        return copy

    def edited_preset(self, file_name, edit):
        """A preset copy whose JSON file `file_name` went through `edit(dict)`."""
        directory = self.preset()
        path = os.path.join(directory, file_name)
        with open(path) as f:
            data = json.load(f)
        edit(data)
        with open(path, "w") as f:
            json.dump(data, f)
        return directory

    def truncated_preset(self):
        directory = self.preset()
        _truncate(os.path.join(directory, "model.safetensors"))
        return directory

    def corrupt_kerashub_preset(self, parent=None):
        directory = os.path.join(parent or self.tmp, "kerashub")
        os.makedirs(directory)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(KERASHUB_CONFIG, f)
        with open(os.path.join(directory, "model.weights.h5"), "wb") as f:
            f.write(b"\x00 not an HDF5 file " * 64)
        return directory


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _del(key):
    return lambda data: data.pop(key)


def _del_config(key):
    return lambda data: data["config"].pop(key)


def _set_config(key, value):
    return lambda data: data["config"].__setitem__(key, value)


def gen(*args, **kwargs):
    """generate on the text model; a short PROMPT run unless told otherwise."""
    if not args:
        args = (PROMPT,)
        kwargs.setdefault("max_new_tokens", 3)
    return lambda c: c.model.generate(*args, **kwargs)


def row(name, call, error, *names):
    return pytest.param(call, error, names, id=name)


V = ValueError
GENERATE = [
    # stop strings and stop ids
    row("stop_strings_not_str", gen(stop_strings=[5]), V, "stop_strings", 'non-empty strings', 'got [5]'),
    row("stop_strings_empty", gen(stop_strings=""), V, "stop_strings", 'non-empty strings', "got ('',)"),
    row("stop_strings_without_tokenizer",
        lambda c: c.bare.generate([[1, 2]], max_new_tokens=2, stop_strings="x"), V, "stop_strings", "tokenizer"),
    row("stop_token_ids_str", gen(stop_token_ids="eos"), V, "stop_token_ids", 'list of integer ids', "got 'eos'"),
    row("stop_token_ids_float", gen(stop_token_ids=[1.5]), V, "stop_token_ids", 'list of integer ids', 'got [1.5]'),
    row("stop_token_ids_outside", gen(stop_token_ids=[500]), V, "stop_token_ids", "500"),
    row("stop_token_ids_negative_int", gen(stop_token_ids=-1), V, "stop_token_ids", "-1"),
    # sampler settings without a sampler that uses them
    row("temperature_without_sampler", gen(temperature=0.8), V, "temperature", "sampler='temperature'"),
    row("top_k_without_sampler", gen(top_k=5), V, "top_k", "sampler='top_k'"),
    row("top_p_without_sampler", gen(top_p=0.9), V, "top_p", "sampler='top_p'"),
    row("min_p_without_sampler", gen(min_p=0.1), V, "min_p", "sampler='min_p'"),
    row("temperature_with_beam", gen(sampler="beam", temperature=0.5), V, "temperature", "sampler='beam'"),
    row("setting_beside_sampler_object", gen(sampler=Sampler(top_k=3), top_p=0.5), V, "top_p", "Sampler"),
    row("setting_beside_beam_object", gen(sampler=BeamSearch(2), top_k=3), V, "top_k", "BeamSearch"),
    # sampler values, whatever the sampler
    row("top_p_str", gen(sampler="top_p", top_p="0.9"), V, "top_p", "'0.9'", "str"),
    row("top_p_str_without_sampler", gen(top_p="0.9"), V, "top_p must be", "got '0.9' (str)"),
    row("top_p_bool", gen(sampler="top_p", top_p=True), V, "top_p", 'in (0, 1]', 'got True (bool)'),
    row("top_p_nan", gen(sampler="top_p", top_p=float("nan")), V, "top_p", 'in (0, 1]', 'got nan'),
    row("top_p_above_one", gen(sampler="top_p", top_p=1.5), V, "top_p", 'in (0, 1]', 'got 1.5'),
    row("top_p_zero", gen(sampler="top_p", top_p=0.0), V, "top_p", 'in (0, 1]', 'got 0.0'),
    row("temperature_negative", gen(sampler="temperature", temperature=-1.0), V, "temperature", '>= 0 and finite', 'got -1.0'),
    row("temperature_inf", gen(sampler="temperature", temperature=float("inf")), V, "temperature", '>= 0 and finite', 'got inf'),
    row("temperature_nan", gen(sampler="temperature", temperature=float("nan")), V, "temperature", '>= 0 and finite', 'got nan'),
    row("temperature_str", gen(sampler="temperature", temperature="hot"), V, "temperature", '>= 0 and finite', "got 'hot' (str)"),
    row("top_k_zero", gen(sampler="top_k", top_k=0), V, "top_k", 'positive integer', 'got 0'),
    row("top_k_float", gen(sampler="top_k", top_k=2.5), V, "top_k", 'positive integer', 'got 2.5'),
    row("top_k_bool", gen(sampler="top_k", top_k=True), V, "top_k", 'positive integer', 'got True (bool)'),
    row("min_p_above_one", gen(sampler="min_p", min_p=1.5), V, "min_p", 'in [0, 1]', 'got 1.5'),
    row("min_p_str", gen(sampler="min_p", min_p="0.1"), V, "min_p", 'in [0, 1]', "got '0.1' (str)"),
    row("unknown_sampler", gen(sampler="nucleus"), V, "sampler", "'nucleus'"),
    row("num_beams_zero", lambda c: c.model.generate(PROMPT, sampler=BeamSearch(num_beams=0)), V, "num_beams", 'positive integer', 'got 0'),
    row("seed_str", gen(sampler="top_k", seed="abc"), V, "seed", "'abc'", '[0, 2**31 - 1]'),
    row("seed_too_big", gen(sampler="top_k", seed=2**40), V, "seed", '[0, 2**31 - 1]', 'got 1099511627776'),
    row("seed_negative", gen(sampler="top_k", seed=-1), V, "seed", '[0, 2**31 - 1]', 'got -1'),
    row("seed_float", gen(sampler="top_k", seed=1.5), V, "seed", '[0, 2**31 - 1]', 'got 1.5'),
    row("seed_bool", gen(sampler="top_k", seed=True), V, "seed", '[0, 2**31 - 1]', 'got True (bool)'),
    # lengths
    row("prompt_beyond_context", gen([list(range(3, 69))]), V, "prompt", "66 tokens", "max_sequence_length 64"),
    row("prompt_at_context", gen([list(range(64))]), V, "prompt", "64 tokens", "max_sequence_length 64"),
    row("max_length_bool", gen(PROMPT, max_length=True), V, "max_length", "integer", "bool"),
    row("max_length_float", gen(PROMPT, max_length=20.5), V, "max_length", 'positive integer', 'got 20.5'),
    row("max_length_zero", gen(PROMPT, max_length=0), V, "max_length", 'positive integer', 'got 0'),
    row("max_length_above_context", gen([[1, 2]], max_length=65), V, "max_length", '65', 'max_sequence_length 64'),
    row("max_length_below_prompt", gen([[1, 2, 3, 4]], max_length=3), V, "max_length", 'prompt (4 tokens) leaves no room', 'max_length is 3'),
    row("max_new_tokens_zero", gen([[1, 2]], max_new_tokens=0), V, "max_new_tokens", 'positive integer', 'got 0'),
    row("max_new_tokens_negative", gen([[1, 2]], max_new_tokens=-5), V, "max_new_tokens", 'positive integer', 'got -5'),
    row("max_new_tokens_float", gen([[1, 2]], max_new_tokens=2.5), V, "max_new_tokens", 'positive integer', 'got 2.5'),
    row("max_new_tokens_bool", gen([[1, 2]], max_new_tokens=True), V, "max_new_tokens", 'positive integer', 'got True'),
    row("max_new_tokens_str", gen([[1, 2]], max_new_tokens="3"), V, "max_new_tokens", 'positive integer', "got '3'"),
    row("max_new_tokens_beyond_context", gen([[1, 2]], max_new_tokens=63), V, "max_new_tokens", '(63)', 'max_sequence_length 64'),
    row("sliding_window_zero", gen(sliding_window_size=0), V, "sliding_window_size", '[1, 64]', 'got 0'),
    row("sliding_window_float", gen(sliding_window_size=2.5), V, "sliding_window_size", '[1, 64]', 'got 2.5'),
    # output options
    row("return_logprobs_str", gen(return_logprobs="yes"), V, "return_logprobs", 'True or False', "got 'yes'"),
    row("stream_str", gen(stream="yes"), V, "stream", 'a callable', "got 'yes'"),
    row("stream_with_logprobs", gen(stream=True, return_logprobs=True), V, "return_logprobs", "stream"),
    row("stream_callable_with_logprobs", gen(stream=print, return_logprobs=True), V, "return_logprobs", 'stream'),
    row("stream_with_beam", gen(stream=True, sampler="beam"), V, "stream", "beam"),
    row("stream_callable_with_beam", gen(stream=print, sampler="beam"), V, "stream", "beam"),
    row("stream_batch", gen(["a", "b"], max_new_tokens=2, stream=True), V, "stream", 'single prompt'),
    # prompts
    row("lone_surrogate", gen("a\ud800b", max_new_tokens=2), V, "prompt", "surrogate", "'\\ud800'"),
    row("lone_surrogate_in_batch", gen(["ok", "\udc80"], max_new_tokens=2), V, "prompt 1", "surrogate"),
    row("empty_prompt", gen(""), V, "prompt", 'Empty prompt', 'at least one character'),
    row("empty_token_prompt", gen([[]]), V, "prompt", 'Empty prompt', 'at least one token'),
    row("mixed_batch", gen([[1, 2], "text"]), V, "prompts", 'all strings or all token-id lists'),
    row("float_token_ids", gen([[1.5, 2]]), V, "token ids", 'lists of integers', '[1.5, 2]'),
    row("token_id_outside_vocabulary", gen([[1, 200]]), V, "token ids", "128"),
    row("prompt_of_wrong_type", gen(5), V, "prompts", 'got int'),
    row("text_without_tokenizer", lambda c: c.bare.generate("hi"), V, "tokenizer", 'from text', 'pass token ids'),
    row("unknown_keyword", gen(temprature=0.8), TypeError, "temprature"),
    # speculative decoding
    row("draft_not_a_model", gen(draft_model="gemma2_demo"), TypeError, "draft_model", "str"),
    row("draft_is_the_model", lambda c: c.model.generate(PROMPT, draft_model=c.model), V, "draft_model", 'the model itself'),
    row("draft_other_vocabulary", lambda c: c.model.generate(PROMPT, draft_model=c.other_vocabulary), V,
        "vocabulary", "96", "128"),
    row("draft_other_tokenizer", lambda c: c.model.generate(PROMPT, draft_model=c.other_tokenizer), V,
        "tokenizer differs"),
    row("draft_tokens_zero", lambda c: c.model.generate(PROMPT, draft_model=c.bare, num_draft_tokens=0), V,
        "num_draft_tokens", "[1, 16]"),
    row("draft_tokens_float", lambda c: c.model.generate(PROMPT, draft_model=c.bare, num_draft_tokens=2.0), V,
        "num_draft_tokens", '[1, 16]', 'got 2.0'),
    row("draft_tokens_without_draft", gen(num_draft_tokens=3), V, "num_draft_tokens", "draft_model"),
    row("draft_with_beam", lambda c: c.model.generate(PROMPT, draft_model=c.bare, sampler="beam"), V,
        "beam", "draft_model"),
    row("draft_context_too_short", lambda c: c.model.generate(PROMPT, max_new_tokens=40, draft_model=c.short),
        V, "draft model's context", "32"),
]

CHAT = [
    row("chat_messages_str", lambda c: c.model.chat("hi"), TypeError, "messages", 'list of dicts', 'got str'),
    row("chat_no_messages", lambda c: c.model.chat([]), V, "message", 'at least one message'),
    row("chat_unknown_role", lambda c: c.model.chat([{"role": "bot", "content": "x"}]), V, "role", "'bot'"),
    row("chat_no_content", lambda c: c.model.chat([{"role": "user"}]), V, "content", "'content' keys", "got keys ['role']"),
    row("chat_temperature_without_sampler", lambda c: c.model.chat(MESSAGES, temperature=0.7), V,
        "temperature", "sampler='temperature'"),
    row("chat_lone_surrogate", lambda c: c.model.chat([{"role": "user", "content": "\ud800"}]), V, "surrogate", "'\\ud800'"),
    row("chat_without_tokenizer", lambda c: c.bare.chat(MESSAGES), V, "tokenizer", 'chat() needs'),
    row("start_chat_without_tokenizer", lambda c: c.bare.start_chat(), V, "tokenizer", 'start_chat() needs'),
    row("start_chat_beam", lambda c: c.model.start_chat(sampler="beam"), V, "beam", "model.chat"),
    row("start_chat_draft", lambda c: c.model.start_chat(draft_model=c.model), V, "speculatively", "draft_model"),
    row("chat_roles_not_alternating", lambda c: c.model.chat([{"role": "user", "content": "a"},
                                                              {"role": "user", "content": "b"}]), V,
        "Message 1", "'user'", "alternate"),
    row("start_chat_history_ends_with_user", lambda c: c.model.start_chat([{"role": "user", "content": "a"}]), V,
        "'user'", "alternate"),
    row("start_chat_on_overflow", lambda c: c.model.start_chat(on_overflow="truncate"), V,
        "on_overflow", "'drop_oldest'"),
    row("start_chat_bad_history", lambda c: c.model.start_chat([{"role": "bot", "content": "x"}]), V, "'bot'", 'unknown role', "'user', 'model'"),
    row("start_chat_budget", lambda c: c.model.start_chat(max_new_tokens=0), V, "max_new_tokens", 'context 64', 'got 0'),
    row("start_chat_window", lambda c: c.model.start_chat(sliding_window_size=0), V, "sliding_window_size", '[1, 64]', 'got 0'),
    row("start_chat_stop_ids", lambda c: c.model.start_chat(stop_token_ids=[500]), V, "stop_token_ids", '[500]', '[0, 128)'),
    row("start_chat_seed", lambda c: c.model.start_chat(sampler="top_k", seed=-1), V, "seed", '[0, 2**31 - 1]', 'got -1'),
    row("send_not_text", lambda c: c.model.start_chat().send(["hi"]), TypeError, "send()", "list"),
    row("send_empty", lambda c: c.model.start_chat().send("  "), V, "Empty message"),
    row("send_budget", lambda c: c.model.start_chat().send("hi", max_new_tokens=64), V, "max_new_tokens", "64"),
    # The message alone is over the context (the 4-token budget would fit): refused for the message.
    row("send_over_the_context", lambda c: c.model.start_chat(max_new_tokens=4).send("hi " * 40), V,
        "does not fit", "holds 0 tokens, the message adds 133", "the reply may take 4",
        "on_overflow='drop_oldest'"),
    row("send_stream_logprobs", lambda c: c.model.start_chat().send("hi", stream=True, return_logprobs=True),
        V, "return_logprobs", 'stream'),
]

SCORE = [
    row("score_empty_text", lambda c: c.model.score(""), V, "text", "empty"),
    row("score_empty_text_in_batch", lambda c: c.model.score(["a", ""]), V, "text 1", "empty"),
    row("score_empty_list", lambda c: c.model.score([]), V, "token_ids", 'empty list'),
    row("score_no_rows", lambda c: c.model.score(np.zeros((0, 4), "int32")), V, "token_ids", "(0, 4)"),
    row("score_no_tokens", lambda c: c.model.score(np.zeros((2, 0), "int32")), V, "token_ids", "(2, 0)"),
    row("score_one_token", lambda c: c.model.score(np.ones((2, 1), "int32")), V, "token_ids", "(2, 1)"),
    row("score_lone_surrogate", lambda c: c.model.score("a\ud800"), V, "text", "surrogate"),
    row("score_one_dimensional", lambda c: c.model.score(np.array([1, 2, 3])), V, "token_ids", '[batch, sequence]', '(3,)'),
    row("score_float_ids", lambda c: c.model.score(np.array([[0.5, 1.0]])), V, "token_ids", 'integers', 'float64'),
    row("score_id_outside_vocabulary", lambda c: c.model.score(np.array([[1, 200]])), V, "token_ids", '[0, 128)', '[200]'),
    row("score_text_without_tokenizer", lambda c: c.bare.score("abc"), V, "tokenizer", 'Scoring text'),
]

LOAD = Gemma2CausalLM.from_preset
def _a_file(folder):
    path = os.path.join(folder, "weights.safetensors")
    open(path, "wb").close()
    return path


FROM_PRESET = [
    row("from_preset_unknown_override", lambda c: LOAD("gemma2_tiny_test", foo=1), V,
        "foo", "dtype", "load_weights", "sliding_window_size"),
    row("from_preset_bad_override_value", lambda c: LOAD("gemma2_tiny_test", sliding_window_size="x"), V,
        "sliding_window_size", 'positive integer', "got 'x'"),
    row("from_preset_load_weights_str", lambda c: LOAD("gemma2_tiny_test", load_weights="no"), V, "load_weights", 'True or False', "got 'no'"),
    row("from_preset_unknown_dtype", lambda c: LOAD("gemma2_tiny_test", dtype="float8x"), V, "dtype", "'float8x'", "'bfloat16'"),
    row("from_preset_unknown_name", lambda c: LOAD("gemma2_tiny_tst"), V, "preset", "gemma2_tiny_test"),
    row("from_preset_not_a_name", lambda c: LOAD(5), TypeError, "preset", 'got 5'),
    row("from_preset_a_file", lambda c: LOAD(_a_file(c.tmp)), V, "is a file", "a preset is a folder"),
    row("from_preset_missing_folder", lambda c: LOAD(os.path.join(c.tmp, "nope")), FileNotFoundError,
        "preset directory", 'nope', 'does not exist'),
    row("config_files_disagree",
        lambda c: LOAD(c.edited_preset("keras_gemma2.json", _set_config("sliding_window_size", 8))), V,
        "sliding_window_size", "config.json", "keras_gemma2.json"),
    row("our_config_incomplete", lambda c: LOAD(c.edited_preset("keras_gemma2.json", _del_config("hidden_dim"))),
        V, "keras_gemma2.json", "hidden_dim"),
    row("our_config_without_config", lambda c: LOAD(c.edited_preset("keras_gemma2.json", _del("config"))),
        V, "keras_gemma2.json", "'config'"),
    row("hf_config_missing_field", lambda c: LOAD(c.edited_preset("config.json", _del("hidden_size"))),
        V, "config.json", "hidden_size"),
    row("truncated_local_safetensors", lambda c: LOAD(c.truncated_preset()), V, "model.safetensors", "truncated"),
    row("corrupt_kerashub_h5", lambda c: LOAD(c.corrupt_kerashub_preset()), V,
        "model.weights.h5", "not a valid KerasHub weights file"),
]


def _full_folder(c):
    target = os.path.join(c.tmp, "full")
    os.makedirs(target)
    open(os.path.join(target, "notes.txt"), "w").close()
    return target


SAVE = [
    row("max_shard_size_str", lambda c: c.model.save_to_preset(c.out, max_shard_size="abc"), V, "max_shard_size", "'4GB'", "got 'abc'"),
    row("max_shard_size_zero", lambda c: c.model.save_to_preset(c.out, max_shard_size=0), V, "max_shard_size", "'4GB'", 'got 0'),
    row("max_shard_size_negative", lambda c: c.model.save_to_preset(c.out, max_shard_size="-1GB"), V,
        "max_shard_size", "'4GB'", "got '-1GB'"),
    row("max_shard_size_bool", lambda c: c.model.save_to_preset(c.out, max_shard_size=True), V, "max_shard_size", "'4GB'", 'got True'),
    row("max_shard_size_none", lambda c: c.model.save_to_preset(c.out, max_shard_size=None), V, "max_shard_size", "'4GB'", 'got None'),
    row("save_into_full_folder", lambda c: c.model.save_to_preset(_full_folder(c)), FileExistsError,
        "save_to_preset will not overwrite", 'full', 'Choose a new path'),
]

LORA = [
    row("lora_rank_zero", lambda c: c.model.enable_lora(0), V, "rank", 'positive integer', 'got 0'),
    row("lora_rank_str", lambda c: c.model.enable_lora("4"), V, "rank", 'positive integer', "got '4'"),
    row("lora_rank_above_width", lambda c: c.model.enable_lora(33), V, "rank 33", "32"),
    row("lora_rank_above_width_of_one_target", lambda c: c.model.enable_lora(40, target_layers="query"), V,
        "rank 40", "'query'"),
    row("lora_unknown_target", lambda c: c.model.enable_lora(2, target_layers=("q_proj",)), V,
        "target_layers", "q_proj"),
    row("lora_unknown_target_str", lambda c: c.model.enable_lora(2, target_layers="qkv"), V,
        "target_layers", "['qkv']"),
    row("lora_target_not_a_name", lambda c: c.model.enable_lora(2, target_layers=5), V, "target_layers", "'query', 'key'", 'got 5'),
    row("lora_no_targets", lambda c: c.model.enable_lora(2, target_layers=[]), V, "target_layers", "'query', 'key'", 'got []'),
    row("lora_alpha_str", lambda c: c.model.enable_lora(2, alpha="x"), V, "alpha", 'positive number', "got 'x'"),
    row("lora_alpha_negative", lambda c: c.model.enable_lora(2, alpha=-1.0), V, "alpha", 'positive number', 'got -1.0'),
    row("save_lora_without_adapters",
        lambda c: c.model.save_lora_weights(os.path.join(c.tmp, "a.safetensors")), V, "enable_lora", 'no LoRA adapters'),
]

QUANTIZE = [
    row("quantize_unknown_mode", lambda c: c.model.quantize("int3"), V, "quantization mode", "'int3'"),
    row("quantize_no_mode", lambda c: c.model.quantize(), V, "quantization mode", "'int8', 'int4'"),
    row("quantize_bad_filters", lambda c: c.model.quantize("int8", filters=5), V, "filters", 'regex', 'got int'),
    row("quantize_bad_regex", lambda c: c.model.quantize("int8", filters="("), V, "filters", "'('"),
]


def _state(model):
    """Everything a rejected call must leave as it was."""
    return {
        "weights": [np.array(w) for w in model.get_weights()],
        "trainable": [layer.trainable for layer in model._flatten_layers()],
        "adapters": len(lora_layers(model)),
        "quantized": quantization_modes(model),
        "compilations": model.generator.compilations,
    }


@pytest.mark.parametrize("call, error, names", GENERATE + CHAT + SCORE + FROM_PRESET + SAVE + LORA + QUANTIZE)
@pytest.mark.backend_agnostic
def test_bad_argument_is_a_clear_error(models, saved_preset, tmp_path, call, error, names):
    context = Context(models, saved_preset, tmp_path)
    before = [_state(model) for model in models]
    with pytest.raises(error) as caught:
        call(context)
    message = str(caught.value)
    for name in names:
        assert name.lower() in message.lower(), f"{name!r} not in: {message}"
    for model, state in zip(models, before):
        after = _state(model)
        assert all(np.array_equal(a, b) for a, b in zip(state.pop("weights"), after.pop("weights")))
        assert after == state
    assert not os.path.exists(context.out)
    assert not [name for name in os.listdir(context.tmp) if name.startswith(".")]  # no staging left


# ---- what corrected arguments now do ------------------------------------------------------------
def test_a_str_stop_string_is_one_string_not_its_characters(models):
    model = models[0]
    text = model.generate(PROMPT, max_new_tokens=24, stop_token_ids=())
    # A 2-character stop string one of whose characters occurs before it: as characters it would
    # cut earlier than as a string.
    stop = next(
        text[k:k + 2] for k in range(1, len(text) - 1)
        if text.find(text[k:k + 2]) == k and set(text[k:k + 2]) & set(text[:k])
    )
    cut = model.generate(PROMPT, max_new_tokens=24, stop_token_ids=(), stop_strings=stop)
    assert cut == text[: text.find(stop)]
    assert cut == model.generate(PROMPT, max_new_tokens=24, stop_token_ids=(), stop_strings=[stop])
    assert len(cut) > min(text.find(ch) for ch in stop)


def test_an_int_stop_token_id_is_one_id(models):
    model = models[1]
    free = model.generate([[3, 17, 29]], max_new_tokens=8, stop_token_ids=())[0].tolist()
    stop = free[3]
    stopped = model.generate([[3, 17, 29]], max_new_tokens=8, stop_token_ids=stop)[0].tolist()
    assert stopped == free[: free.index(stop)]
    assert stopped == model.generate([[3, 17, 29]], max_new_tokens=8, stop_token_ids=[stop])[0].tolist()
    assert stopped == model.generate([[3, 17, 29]], max_new_tokens=8, stop_token_ids=np.int64(stop))[0].tolist()


def test_sampling_settings_with_their_sampler_still_work(models):
    model = models[0]
    greedy = model.generate(PROMPT, max_new_tokens=4, stop_token_ids=())
    assert model.generate(PROMPT, max_new_tokens=4, stop_token_ids=(), temperature=0) == greedy
    assert model.generate(PROMPT, max_new_tokens=4, stop_token_ids=(), sampler="top_k", top_k=1,
                          temperature=0.8, seed=np.int64(3)) == greedy
    sampled = model.generate(PROMPT, max_new_tokens=4, stop_token_ids=(), sampler="top_p", top_p=np.float32(0.9),
                             seed=2**31 - 1)
    assert isinstance(sampled, str)


def test_a_prompt_one_short_of_the_context_gets_one_token(models):
    tokens = models[1].generate([list(range(3, 66))], stop_token_ids=())  # 63 tokens, context 64
    assert len(tokens[0]) == 1


def test_score_of_a_one_token_text(models):
    model = models[0]
    (ids,) = model.tokenizer(["a"])
    assert len(ids) == 2  # <bos> a
    (logprobs,) = model.score("a")
    # The one score is log P(a | <bos>): the forward's log-softmax at <bos>, taken at "a".
    logits = logits_of(model, np.array([ids], "int32"))[0, 0].astype("float64")
    expected = logits[ids[1]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert logprobs.shape == (1,) and logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_a_str_target_layer_is_one_target(models):
    model = Gemma2CausalLM(Gemma2Backbone(TINY))
    model.set_weights(models[1].get_weights())
    model.enable_lora(2, target_layers="query")
    adapted = lora_layers(model)
    assert [layer.name for layer in adapted] == ["query"] * TINY.num_layers
    assert model.backbone.lora_targets == ("query",)


def test_rank_up_to_the_width_is_accepted(models):
    model = Gemma2CausalLM(Gemma2Backbone(TINY))
    model.enable_lora(32, target_layers=("query", "key", "down"))  # every width is 32 or more
    assert len(lora_layers(model)) == 3 * TINY.num_layers


# ---- presets: one source of truth, permissions, the right repair advice -----------------------
@pytest.mark.backend_agnostic
def test_agreeing_config_files_load_and_config_json_alone_loads(saved_preset, models, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(saved_preset, copy)
    loaded = Gemma2CausalLM.from_preset(copy)
    assert loaded.config == TINY
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), models[0].get_weights()))
    os.remove(os.path.join(copy, "keras_gemma2.json"))
    assert Gemma2CausalLM.from_preset(copy).config == TINY


@pytest.mark.backend_agnostic
def test_config_json_is_the_source_of_truth(saved_preset, tmp_path):
    """Both files edited the same way load; config.json alone edited is refused."""
    copy = str(tmp_path / "copy")
    shutil.copytree(saved_preset, copy)
    for name, key in (("config.json", "sliding_window"), ("keras_gemma2.json", "sliding_window_size")):
        path = os.path.join(copy, name)
        data = json.load(open(path))
        (data["config"] if name == "keras_gemma2.json" else data)[key] = 8
        json.dump(data, open(path, "w"))
        if name == "config.json":
            with pytest.raises(ValueError, match=r"sliding_window_size: config.json 8 vs keras_gemma2.json 4"):
                Gemma2CausalLM.from_preset(copy)
    assert Gemma2CausalLM.from_preset(copy).config.sliding_window_size == 8


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
@pytest.mark.backend_agnostic
def test_preset_permissions_follow_the_umask(models, tmp_path, umask):
    target = str(tmp_path / "preset")
    previous = os.umask(umask)
    try:
        models[0].save_to_preset(target)
    finally:
        os.umask(previous)
    assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask
    files = os.listdir(target)
    assert "model.safetensors" in files and "tokenizer.model" in files
    for name in files:
        assert os.stat(os.path.join(target, name)).st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.backend_agnostic
def test_bad_files_in_a_local_folder_are_not_downloaded_again(saved_preset, models, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    context = Context(models, saved_preset, tmp_path)
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated") as caught:
        Gemma2CausalLM.from_preset(context.truncated_preset())
    assert "download" not in str(caught.value).lower() and "complete copy" in str(caught.value)
    with pytest.raises(OSError, match=r"model\.weights\.h5 is not a valid KerasHub weights file") as caught:
        Gemma2CausalLM.from_preset(context.corrupt_kerashub_preset())
    assert "download" not in str(caught.value).lower()


@pytest.mark.parametrize("cache", ["KAGGLEHUB_CACHE", "HF_HUB_CACHE"])
@pytest.mark.backend_agnostic
def test_bad_files_in_a_download_cache_say_download_again(saved_preset, models, tmp_path, monkeypatch, cache):
    root = tmp_path / "cache"
    monkeypatch.setenv(cache, str(root))
    snapshot = root / "models" / "gemma2_tiny" / "1"
    os.makedirs(snapshot)
    copy = str(snapshot / "preset")
    shutil.copytree(saved_preset, copy)
    _truncate(os.path.join(copy, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated.*download the preset again"):
        Gemma2CausalLM.from_preset(copy)
    context = Context(models, saved_preset, tmp_path)
    with pytest.raises(ValueError, match=r"not a valid KerasHub weights file.*download the preset again"):
        Gemma2CausalLM.from_preset(context.corrupt_kerashub_preset(parent=str(snapshot)))
