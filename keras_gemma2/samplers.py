"""Token samplers that run inside the compiled decode loop (keras.ops only).

A sampler is a frozen description (its settings are part of the compile
key); `select(logits, seed)` maps float32 logits [batch, vocab] to token ids.
Settings combine in the usual order: temperature, then top-k, top-p, min-p.
"""

import dataclasses

from keras import ops

from keras_gemma2 import backend_utils

_REMOVED = -1e30


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
        if self.temperature is None or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.temperature == 0:  # the limit of temperature -> 0
            object.__setattr__(self, "greedy", True)

    def select(self, logits, seed):
        if self.greedy:
            return ops.cast(ops.argmax(logits, axis=-1), "int32")
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth_best = ops.top_k(logits, self.top_k, sorted=True)[0][:, -1:]
            logits = ops.where(logits < kth_best, _REMOVED, logits)
        if self.top_p is not None and self.top_p < 1:
            ordered = ops.flip(ops.sort(logits, axis=-1), axis=-1)
            probabilities = ops.softmax(ordered, axis=-1)
            mass_before = ops.cumsum(probabilities, axis=-1) - probabilities
            # The smallest logit still inside the nucleus (the top token always is).
            kept = ops.where(mass_before < self.top_p, ordered, ordered[:, :1])
            threshold = ops.min(kept, axis=-1, keepdims=True)
            logits = ops.where(logits < threshold, _REMOVED, logits)
        if self.min_p is not None and self.min_p > 0:
            probabilities = ops.softmax(logits, axis=-1)
            floor = self.min_p * ops.max(probabilities, axis=-1, keepdims=True)
            logits = ops.where(probabilities < floor, _REMOVED, logits)
        return backend_utils.stateless_categorical(logits, seed)


SAMPLER_NAMES = ("greedy", "temperature", "top_k", "top_p", "min_p", "beam")


def get_sampler(sampler, temperature=None, top_k=None, top_p=None, min_p=None):
    """A Sampler from a name plus settings, or a Sampler / BeamSearch as given."""
    if isinstance(sampler, (Sampler, BeamSearch)):
        return sampler
    if sampler not in SAMPLER_NAMES:
        raise ValueError(
            f"Unknown sampler {sampler!r}. Use one of {', '.join(SAMPLER_NAMES)}, "
            "or pass a keras_gemma2.Sampler / BeamSearch object."
        )
    if sampler == "beam":
        return BeamSearch()
    settings = {"temperature": 1.0 if temperature is None else temperature}
    settings.update({k: v for k, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)) if v is not None})
    if sampler == "greedy":
        return Sampler(greedy=True)
    if sampler == "top_k" and "top_k" not in settings:
        settings["top_k"] = 50
    if sampler == "top_p" and "top_p" not in settings:
        settings["top_p"] = 0.9
    if sampler == "min_p" and "min_p" not in settings:
        settings["min_p"] = 0.05
    return Sampler(**settings)


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    """Keep the `num_beams` most likely continuations (sum of log-probs)."""

    num_beams: int = 4

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {self.num_beams!r}.")
