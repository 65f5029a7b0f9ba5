"""keras-hub's sampler classes, for `compile(sampler=...)`: each is this library's Sampler plus
the seed generate uses by default (`import keras_gemma2 as keras_hub` keeps a tutorial's
`keras_hub.samplers.TopKSampler(k=5, seed=2)` as it is)."""

from keras_gemma2.generation.samplers import BeamSearch, Sampler, SeededSampler


class GreedySampler(SeededSampler):
    def __init__(self):
        super().__init__(Sampler(greedy=True), None)


class TopKSampler(SeededSampler):
    def __init__(self, k=5, seed=None, temperature=1.0):
        super().__init__(Sampler(temperature=temperature, top_k=k), seed)


class TopPSampler(SeededSampler):
    def __init__(self, p=0.1, k=None, seed=None, temperature=1.0):
        super().__init__(Sampler(temperature=temperature, top_p=p, top_k=k), seed)


class RandomSampler(SeededSampler):
    def __init__(self, seed=None, temperature=1.0):
        super().__init__(Sampler(temperature=temperature), seed)


class BeamSampler(SeededSampler):
    def __init__(self, num_beams=5):
        super().__init__(BeamSearch(num_beams=num_beams), None)


__all__ = ["BeamSampler", "GreedySampler", "RandomSampler", "TopKSampler", "TopPSampler"]
