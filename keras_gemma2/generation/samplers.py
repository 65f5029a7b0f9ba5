"""Token samplers that run inside the compiled decode loop (keras.ops only).

A sampler is a frozen description. Its `kind` (greedy, or which filters
apply) is part of the compile key; its numbers (`settings`: temperature,
top-k, top-p, min-p) are runtime inputs, so changing them compiles nothing.
`select(kind, logits, seed, settings)` maps float32 logits [batch, vocab] to
token ids. Settings combine in the usual order: temperature, then top-k,
top-p, min-p.
"""

import dataclasses
import math

import numpy as np
from keras import ops

from keras_gemma2 import backend


def lowest(dtype="float32"):
    """The most negative finite value of `dtype`: a removed token's logit, an impossible
    beam's score. Taken from the dtype it fills, so it never leaves that dtype's range
    (a literal such as -1e30 is -inf in float16), and finite, so no row becomes NaN."""
    return float(np.finfo(dtype).min)


def is_integer(value):
    """A Python or numpy integer, not a bool (True is an int to Python)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real_number(value):
    """A Python or numpy int/float, not a bool or a string."""
    return is_integer(value) or isinstance(value, (float, np.floating))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """greedy=True takes the argmax; otherwise sample from the filtered distribution.

    temperature > 0; top_k >= 1 keeps the k most likely tokens; top_p in
    (0, 1] keeps the smallest set whose probability reaches p; min_p in
    [0, 1] drops tokens below min_p times the top token's probability.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    min_p: float = None

    def __post_init__(self):
        # Checked here, not in the compiled loop: a str, bool or NaN would fail deep inside
        # it or sample from a meaningless distribution.
        for name, allowed, example in (
            ("temperature", ">= 0 and finite", 0.8),
            ("top_p", "in (0, 1]", 0.9),
            ("min_p", "in [0, 1]", 0.05),
        ):
            value = getattr(self, name)
            if value is None and name != "temperature":
                continue
            if not is_real_number(value):
                raise ValueError(
                    f"{name} must be {allowed}, got {value!r} ({type(value).__name__}); "
                    f"pass a number such as {name}={example}."
                )
            value = float(value)
            low_ok = value > 0 if name == "top_p" else value >= 0
            high = math.inf if name == "temperature" else 1.0
            if not (low_ok and value <= high and math.isfinite(value)):
                raise ValueError(f"{name} must be {allowed}, got {value}; pass e.g. {name}={example}.")
            object.__setattr__(self, name, value)
        if self.top_k is not None:
            if not is_integer(self.top_k) or self.top_k <= 0:
                raise ValueError(
                    f"top_k must be a positive integer, got {self.top_k!r} "
                    f"({type(self.top_k).__name__}); pass e.g. top_k=50."
                )
            object.__setattr__(self, "top_k", int(self.top_k))
        # Temperature 0 is greedy (the limit), and so is one so small that float32 logits
        # (|x| <= 30 after the final soft-cap) divided by it would pass float32's range:
        # its distribution is one-hot long before.
        if self.temperature * float(np.finfo(np.float32).max) < 100:
            object.__setattr__(self, "greedy", True)

    def kind(self, vocabulary_size):
        """What the compiled program must do (hashable): greedy, or which filters apply.

        top-k keeps a power-of-two bucket of candidates (>= 64), so k's value is a
        runtime setting too; k >= the vocabulary filters nothing.
        """
        if self.greedy:
            return ("greedy",)
        top_k = None
        if self.top_k is not None and self.top_k < vocabulary_size:
            top_k = min(vocabulary_size, power_of_two(self.top_k, TOP_K_MIN_CANDIDATES))
        return (
            "sample", top_k,
            self.top_p is not None and self.top_p < 1,
            self.min_p is not None and self.min_p > 0,
        )

    def settings(self):
        """The runtime numbers: float32 [temperature, top_k, top_p, min_p] (unused ones 0)."""
        return np.array([self.temperature, self.top_k or 0, self.top_p or 0, self.min_p or 0], "float32")

    def select(self, logits, seed):
        """One token per row of `logits` [batch, vocab] (outside a compiled loop)."""
        return select(self.kind(logits.shape[-1]), logits, seed, self.settings())


TOP_K_MIN_CANDIDATES = 64


def power_of_two(value, smallest):
    """The smallest power of two >= value, starting from `smallest` (a power of two)."""
    size = smallest
    while size < value:
        size *= 2
    return size


def select(kind, logits, seed, settings):
    """Token ids [batch] from float32 logits [batch, vocab]: `kind` static, `settings` a tensor."""
    if kind[0] == "greedy":
        return ops.cast(ops.argmax(logits, axis=-1), "int32")
    return backend.stateless_categorical(filtered_logits(kind, logits, settings), seed)


def filtered_logits(kind, logits, settings):
    """The logits a sampling `kind` draws from [batch, vocab]: scaled by the temperature,
    tokens outside top-k / top-p / min-p set to a large negative value."""
    _, top_k_candidates, top_p, min_p = kind
    logits = logits / settings[0]
    if top_k_candidates is not None:
        best = ops.top_k(logits, top_k_candidates, sorted=True)[0]
        k = ops.cast(settings[1], "int32")
        kth_best = ops.take(best, k - 1, axis=1)[:, None]
        logits = ops.where(logits < kth_best, lowest(), logits)
    if top_p:
        ordered = ops.flip(ops.sort(logits, axis=-1), axis=-1)
        probabilities = ops.softmax(ordered, axis=-1)
        mass_before = ops.cumsum(probabilities, axis=-1) - probabilities
        # The smallest logit still inside the nucleus (the top token always is).
        kept = ops.where(mass_before < settings[2], ordered, ordered[:, :1])
        threshold = ops.min(kept, axis=-1, keepdims=True)
        logits = ops.where(logits < threshold, lowest(), logits)
    if min_p:
        probabilities = ops.softmax(logits, axis=-1)
        floor = settings[3] * ops.max(probabilities, axis=-1, keepdims=True)
        logits = ops.where(probabilities < floor, lowest(), logits)
    return logits


SAMPLER_NAMES = ("greedy", "temperature", "top_k", "top_p", "min_p", "beam")


def get_sampler(sampler, temperature=None, top_k=None, top_p=None, min_p=None):
    """A Sampler from a name plus settings, or a Sampler / BeamSearch as given.

    Settings the chosen sampler would ignore are refused, so that e.g.
    `temperature=0.8` without `sampler=` is never silently greedy.
    """
    if not isinstance(sampler, (Sampler, BeamSearch)) and sampler not in SAMPLER_NAMES:
        raise ValueError(
            f"Unknown sampler {sampler!r}. Use one of {', '.join(SAMPLER_NAMES)}, "
            "or pass a keras_gemma2.Sampler / BeamSearch object."
        )
    pairs = (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))
    given = {name: value for name, value in pairs if value is not None}
    # Validate the values whatever the sampler (a throwaway Sampler checks them all).
    Sampler(**{"temperature": 1.0, **given})
    if given and isinstance(sampler, (Sampler, BeamSearch)):
        text = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(
            f"{text} would be ignored: `sampler` is a {type(sampler).__name__} object, which "
            "carries its own settings. Set them in the object (e.g. "
            f"keras_gemma2.Sampler({text})) or pass a sampler name instead."
        )
    if isinstance(sampler, (Sampler, BeamSearch)):
        return sampler
    if sampler == "greedy" and given.get("temperature") == 0:
        del given["temperature"]  # temperature 0 is greedy
    if given and sampler in ("greedy", "beam"):
        name = next(iter(given))
        what = "takes the most likely token" if sampler == "greedy" else "keeps the most likely beams"
        also = " (or 'top_k', 'top_p', 'min_p', which also apply temperature)" if name == "temperature" else ""
        raise ValueError(
            f"{name}={given[name]!r} needs a sampling sampler: sampler={sampler!r} {what} and would "
            f"ignore it. Pass sampler={name!r}{also}, e.g. generate(..., sampler={name!r}, "
            f"{name}={given[name]!r})."
        )
    if sampler == "beam":
        return BeamSearch()
    if sampler == "greedy":
        return Sampler(greedy=True)
    settings = {"temperature": 1.0, **given}
    if sampler == "top_k" and "top_k" not in settings:
        settings["top_k"] = 50
    if sampler == "top_p" and "top_p" not in settings:
        settings["top_p"] = 0.9
    if sampler == "min_p" and "min_p" not in settings:
        settings["min_p"] = 0.05
    return Sampler(**settings)


# keras-hub's sampler names (`compile(sampler="top_k")`) that differ from this library's.
KERAS_HUB_NAMES = {"random": "temperature"}


def from_keras_hub(sampler):
    """(sampler, seed) for one of keras-hub's sampler objects, or None for anything else.

    Recognized by class and module name, so keras-hub is never imported: a user who
    has it (a tutorial's `keras_hub.samplers.TopKSampler(k=5, seed=2)`) gets this
    library's equivalent, and its seed becomes generate's default seed.
    """
    if not type(sampler).__module__.startswith("keras_hub"):
        return None
    name = type(sampler).__name__
    temperature = float(getattr(sampler, "temperature", 1.0))
    seed = getattr(sampler, "seed", None)
    if name == "GreedySampler":
        return Sampler(greedy=True), None
    if name == "TopKSampler":
        return Sampler(temperature=temperature, top_k=int(sampler.k)), seed
    if name == "TopPSampler":
        k = getattr(sampler, "k", None)
        return Sampler(temperature=temperature, top_p=float(sampler.p), top_k=None if k is None else int(k)), seed
    if name == "RandomSampler":
        return Sampler(temperature=temperature), seed
    if name == "BeamSampler":
        return BeamSearch(num_beams=int(sampler.num_beams)), None
    raise ValueError(
        f"keras-hub's {name} has no equivalent here; use one of GreedySampler, TopKSampler, "
        f"TopPSampler, RandomSampler, BeamSampler, or a name from {SAMPLER_NAMES}."
    )


class SeededSampler:
    """A Sampler (or BeamSearch) with the seed generate uses by default (keras_gemma2.samplers)."""

    def __init__(self, sampler, seed):
        if seed is not None and not is_integer(seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}.")
        self.sampler, self.seed = sampler, seed

    def __repr__(self):
        return f"{type(self).__name__}({self.sampler!r}, seed={self.seed!r})"


def compiled_sampler(sampler):
    """(sampler, seed) for `Gemma2CausalLM.compile(sampler=...)`: a name (this library's or
    keras-hub's), a Sampler / BeamSearch, keras_gemma2.samplers' or keras-hub's sampler objects."""
    if isinstance(sampler, SeededSampler):
        return sampler.sampler, sampler.seed
    mapped = from_keras_hub(sampler)
    if mapped is not None:
        return mapped
    if isinstance(sampler, str):
        sampler = KERAS_HUB_NAMES.get(sampler, sampler)
    return get_sampler(sampler), None


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """Keep the `num_beams` most likely continuations (sum of log-probs)."""

    num_beams: int = 4

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}.")
