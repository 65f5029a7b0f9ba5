"""Knowledge distillation, Gemma 2's recipe (paper section 3.2).

The student minimises, at every token, the cross-entropy to the teacher's
whole next-token distribution: sum_x -P_T(x | ctx) log P_S(x | ctx),
optionally at a temperature and mixed with the usual one-hot next-token loss.

`Distiller` is a Keras model: `compile()` then `fit(x)` with `x` a dict of
token ids and padding mask, on any backend. Its forward returns the student's
hidden states, and the loss projects them onto the vocabulary a chunk of
positions at a time, so at most one [batch, chunk, vocab] slice of each
model's logits exists at once instead of two full [batch, seq, vocab] tensors.
"""

import keras
from keras import ops

from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.training.batch_checks import CheckedTraining


def soft_cross_entropy(student_logits, teacher_logits, temperature=1.0):
    """Per position sum_x -softmax(t/T)_x * log_softmax(s/T)_x, float32 [..]."""
    teacher = ops.softmax(ops.cast(teacher_logits, "float32") / temperature, axis=-1)
    student = ops.log_softmax(ops.cast(student_logits, "float32") / temperature, axis=-1)
    return -ops.sum(teacher * student, axis=-1)


def hard_cross_entropy(student_logits, targets):
    """Per position -log softmax(s)[target], float32."""
    log_probs = ops.log_softmax(ops.cast(student_logits, "float32"), axis=-1)
    return -ops.take_along_axis(log_probs, ops.cast(targets, "int32")[..., None], axis=-1)[..., 0]


class StudentTrainer(CheckedTraining, keras.Model):
    """What the online and offline distillers share.

    The forward pass returns the student's hidden states; `chunked_mean`
    projects them to the vocabulary `chunk_size` positions at a time and
    averages a per-token loss over the real (non-padding) next-token targets.
    """

    def _vocabulary_size(self):
        return self.student.config.vocabulary_size

    def call(self, inputs, training=False):
        inputs = {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}
        return self.student.backbone(inputs, training=training)

    def compile(self, optimizer="auto", **kwargs):
        if optimizer == "auto":
            optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.01)
        super().compile(optimizer=optimizer, **kwargs)

    def chunked_mean(self, x, hidden, per_token, sample_weight=None):
        """sum over chunks of per_token(student_logits, start, stop) * weights / sum of weights."""
        length = ops.shape(x["token_ids"])[1]
        weights = ops.cast(x["padding_mask"][:, 1:], "float32")
        if sample_weight is not None:
            weights = weights * ops.cast(sample_weight, "float32")[:, 1:]
        total = ops.zeros((), "float32")
        for start in range(0, length - 1, self.chunk_size):
            stop = min(start + self.chunk_size, length - 1)
            logits = self.student.backbone.token_embedding(hidden[:, start:stop], reverse=True)
            total = total + ops.sum(per_token(logits, start, stop) * weights[:, start:stop])
        return total / ops.maximum(ops.sum(weights), 1.0)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.get_metrics_result()


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Distiller(StudentTrainer):
    """A frozen teacher Gemma2CausalLM and a trainable student Gemma2CausalLM.

    Args:
        teacher, student: Gemma2CausalLM; they may differ in depth, width and
            heads but must share the vocabulary.
        temperature: softens both distributions; the soft loss is scaled by
            temperature**2 so its gradients keep their size (Hinton et al.).
        hard_label_weight: weight in [0, 1] of the one-hot next-token loss;
            the distillation loss gets 1 - hard_label_weight.
        chunk_size: sequence positions projected to the vocabulary at once.
    """

    def __init__(self, teacher, student, temperature=1.0, hard_label_weight=0.0, chunk_size=128, **kwargs):
        super().__init__(**kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, Gemma2CausalLM):
                raise TypeError(f"`{role}` must be a Gemma2CausalLM, got {type(model).__name__}.")
        if teacher.config.vocabulary_size != student.config.vocabulary_size:
            raise ValueError(
                f"Teacher and student vocabularies differ ({teacher.config.vocabulary_size} vs "
                f"{student.config.vocabulary_size} tokens): distillation compares distributions "
                "over the same tokens, so both must use the same tokenizer."
            )
        if teacher.tokenizer is not None and student.tokenizer is not None and (
            teacher.tokenizer.proto_bytes != student.tokenizer.proto_bytes
        ):
            raise ValueError("Teacher and student use different tokenizers; they must share one.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not 0 <= hard_label_weight <= 1:
            raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight}.")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self.temperature = float(temperature)
        self.hard_label_weight = float(hard_label_weight)
        self.chunk_size = chunk_size

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Mean over real next-token positions of the mixed distillation loss."""
        teacher_hidden = ops.stop_gradient(self.teacher.backbone(x, training=False))
        targets = x["token_ids"][:, 1:]

        def per_token(student_logits, start, stop):
            return self.token_losses(student_logits, teacher_hidden[:, start:stop], targets[:, start:stop])

        loss = self.chunked_mean(x, y_pred, per_token, sample_weight)
        return loss + sum(self.losses) if self.losses else loss

    def token_losses(self, student_logits, teacher_hidden, targets):
        """Per-position loss of one chunk (the teacher's logits are made here, then dropped)."""
        teacher_logits = ops.stop_gradient(
            self.teacher.backbone.token_embedding(teacher_hidden, reverse=True)
        )
        soft = soft_cross_entropy(student_logits, teacher_logits, self.temperature)
        loss = (1.0 - self.hard_label_weight) * soft * self.temperature**2
        if self.hard_label_weight:
            loss = loss + self.hard_label_weight * hard_cross_entropy(student_logits, targets)
        return loss

    def get_config(self):
        return {
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": self.temperature,
            "hard_label_weight": self.hard_label_weight,
            "chunk_size": self.chunk_size,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)
