"""The Gemma 2 architecture as one validated description.

`Gemma2Config` is the single source of shape truth: the backbone, the
checkpoint converters, the parameter counter and the presets all read it.
"""

import dataclasses
import json
import math

from keras_gemma2.checkpoints import presets


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Every number of the Gemma 2 design.

    `intermediate_dim` is the width of ONE feed-forward branch (gate or up),
    as in transformers (2B: 9216); keras-hub stores twice that.
    Layers with an even index (0, 2, ...) attend over a sliding window of
    `sliding_window_size` keys (key j visible to query i iff
    0 <= i - j < window); odd layers are global.
    """

    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    intermediate_dim: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window_size: int = 4096
    attention_logit_soft_cap: float = 50.0
    final_logit_soft_cap: float = 30.0
    rope_max_wavelength: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    max_sequence_length: int = 8192

    def __post_init__(self):
        problems = []
        for name in (
            "vocabulary_size",
            "num_layers",
            "hidden_dim",
            "intermediate_dim",
            "num_query_heads",
            "num_key_value_heads",
            "head_dim",
            "sliding_window_size",
            "max_sequence_length",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"`{name}` must be a positive integer, got {value!r}")
        for name in (
            "query_pre_attn_scalar",
            "attention_logit_soft_cap",
            "final_logit_soft_cap",
            "rope_max_wavelength",
            "layer_norm_epsilon",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"`{name}` must be a positive number, got {value!r}")
        if not problems:
            if self.num_query_heads % self.num_key_value_heads:
                problems.append(
                    f"`num_query_heads` ({self.num_query_heads}) must be divisible by "
                    f"`num_key_value_heads` ({self.num_key_value_heads}) for grouped-query attention"
                )
            if self.head_dim % 2:
                problems.append(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}")
            if self.sliding_window_size > self.max_sequence_length:
                problems.append(
                    f"`sliding_window_size` ({self.sliding_window_size}) must not exceed "
                    f"`max_sequence_length` ({self.max_sequence_length})"
                )
        if problems:
            raise ValueError("Invalid Gemma2Config: " + "; ".join(problems) + ".")

    # ---- derived facts -------------------------------------------------
    @property
    def query_groups(self):
        """Query heads that share one key/value head."""
        return self.num_query_heads // self.num_key_value_heads

    def is_sliding(self, layer_index):
        """Even-indexed layers use the sliding window; odd ones are global."""
        return layer_index % 2 == 0

    @property
    def embedding_scale(self):
        return math.sqrt(self.hidden_dim)

    def parameter_count(self):
        """Number of weights, computed from shapes alone (nothing allocated)."""
        attention = self.hidden_dim * self.head_dim * (
            2 * self.num_query_heads + 2 * self.num_key_value_heads
        )
        feed_forward = 3 * self.hidden_dim * self.intermediate_dim
        norms = 4 * self.hidden_dim
        per_layer = attention + feed_forward + norms
        embedding = self.vocabulary_size * self.hidden_dim  # tied with the output projection
        return embedding + self.num_layers * per_layer + self.hidden_dim  # + final norm

    # ---- (de)serialisation ----------------------------------------------
    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ValueError(f"A Gemma2Config needs a dict of fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown Gemma2Config fields {unknown}; expected a subset of {sorted(known)}."
            )
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"Incomplete Gemma2Config: missing field(s) {missing}.")
        return cls(**data)

    @classmethod
    def from_preset(cls, preset):
        """The architecture of a registered preset (no download) or a checkpoint directory."""
        return presets.read_preset(preset, cls, load_weights=False)[0]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
