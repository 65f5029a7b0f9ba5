"""A training loop with crash-safe checkpoints, resumption, progress and evaluation.

Works for plain next-token training (a compiled Gemma2CausalLM) and for a
Distiller. Every `checkpoint_every` steps the trained weights and the
optimizer state go to a new `step_NNNNNNN/` folder, and only then does the
`latest` pointer move to it: a crash mid-save leaves the previous checkpoint
in use, and a killed run loses at most `checkpoint_every` steps.
"""

import json
import math
import os
import shutil
import sys
import time

import keras
import numpy as np

from keras_gemma2.checkpoints import safetensors_io
from keras_gemma2.data import batch_at
from keras_gemma2.files import atomic_write

LATEST = "latest"


def trained_model(model):
    """The model whose weights change: the student of a Distiller, else the model."""
    return getattr(model, "student", model)


# ---- checkpoints ---------------------------------------------------------------
def save_checkpoint(model, directory, step, history):
    """Write step_NNNNNNN/ (weights, optimizer, state), then point `latest` at it."""
    name = f"step_{step:07d}"
    final = os.path.join(directory, name)
    staging = os.path.join(directory, f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    student = trained_model(model)
    tensors = {f"model/{v.path}": _numpy(v) for v in student.weights}
    tensors.update({_optimizer_key(v): _numpy(v) for v in model.optimizer.variables})
    safetensors_io.write_file(os.path.join(staging, "state.safetensors"), tensors)
    state = {"step": step, "config": student.config.to_dict(), "history": history}
    with atomic_write(os.path.join(staging, "state.json"), "w") as f:
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    with atomic_write(os.path.join(directory, LATEST), "w") as f:
        f.write(name)
    for other in os.listdir(directory):  # keep only the newest complete checkpoint
        if other.startswith("step_") and other != name:
            shutil.rmtree(os.path.join(directory, other), ignore_errors=True)


def load_checkpoint(model, directory):
    """Restore the newest checkpoint into `model` (compiled); returns its state or None."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        folder = os.path.join(directory, f.read().strip())
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    student = trained_model(model)
    if state["config"] != student.config.to_dict():
        raise ValueError(
            f"{directory} holds checkpoints of another architecture "
            f"({_config_difference(state['config'], student.config.to_dict())}); "
            "use a new checkpoint directory or the matching model."
        )
    stored = safetensors_io.SafetensorsFile(os.path.join(folder, "state.safetensors"))
    model.optimizer.build(model.trainable_variables)
    for variable in student.weights:
        variable.assign(np.array(stored.get(f"model/{variable.path}")))
    for variable in model.optimizer.variables:
        variable.assign(np.array(stored.get(_optimizer_key(variable))))
    return state


def _optimizer_key(variable):
    """'adam_3/iteration' -> 'optimizer/iteration': optimizer names differ between processes."""
    return "optimizer/" + variable.path.split("/", 1)[-1]


def _config_difference(saved, current):
    return ", ".join(
        f"{k}: {saved.get(k)} there vs {current.get(k)} here"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    )


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


# ---- evaluation ---------------------------------------------------------------------
def perplexity(causal_lm, batches):
    """exp(mean next-token negative log-likelihood) over real tokens."""
    total, count = 0.0, 0
    for batch in batches:
        logprobs = causal_lm.score(batch["token_ids"], batch["padding_mask"])
        mask = batch["padding_mask"][:, 1:].astype(bool)
        total += float(-logprobs[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


# ---- the loop -------------------------------------------------------------------------
def train(
    model,
    batches,
    steps,
    batch_size,
    sequence_length,
    checkpoint_dir=None,
    checkpoint_every=100,
    eval_batches=None,
    eval_every=None,
    seed=0,
    log=None,
):
    """Train `model` (compiled) for `steps` steps; resume from `checkpoint_dir` if possible.

    `batches`: a token stream (random windows of it are drawn, a pure function
    of the step) or a callable `step -> batch dict` (e.g. an offline
    distillation store).

    Returns the history: a list of {"step", "loss", "tokens_per_second"} and
    {"step", "eval_perplexity"} records.
    """
    log = log or sys.stdout
    student = trained_model(model)
    if sequence_length > student.config.max_sequence_length:
        raise ValueError(
            f"sequence length {sequence_length} exceeds the model's max_sequence_length "
            f"{student.config.max_sequence_length}."
        )
    history, start = [], 0
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        state = load_checkpoint(model, checkpoint_dir)
        if state is not None:
            start, history = state["step"], state["history"]
            print(f"resumed from step {start} ({checkpoint_dir})", file=log, flush=True)
    began, tokens = time.time(), 0
    for step in range(start, steps):
        if callable(batches):
            batch = batches(step)
        else:
            batch = batch_at(batches, step, batch_size, sequence_length, seed)
        loss = model.train_on_batch(batch, return_dict=True)["loss"]
        tokens += batch_size * sequence_length
        rate = tokens / max(time.time() - began, 1e-9)
        history.append({"step": step + 1, "loss": float(loss), "tokens_per_second": rate})
        _progress(step + 1, steps, float(loss), rate, log)
        if eval_batches and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            value = perplexity(student, eval_batches)
            history.append({"step": step + 1, "eval_perplexity": value})
            print(f"\nstep {step + 1}: held-out perplexity {value:.3f}", file=log, flush=True)
        if checkpoint_dir and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(model, checkpoint_dir, step + 1, history)
    print(file=log, flush=True)
    return history


def _progress(step, steps, loss, rate, log):
    width = 30
    filled = int(width * step / steps)
    bar = "#" * filled + "." * (width - filled)
    print(f"\r[{bar}] {step}/{steps} loss {loss:.4f} {rate:,.0f} tok/s", end="", file=log, flush=True)


def plot_history(history, path, title="training loss"):
    """Loss curve (and held-out perplexity) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history if "loss" in r]
    axis.plot(steps, [r["loss"] for r in history if "loss" in r], label="train loss")
    evals = [r for r in history if "eval_perplexity" in r]
    if evals:
        axis.plot([r["step"] for r in evals], [math.log(r["eval_perplexity"]) for r in evals],
                  "o-", label="held-out log-perplexity")
    axis.set_xlabel("step")
    axis.set_ylabel("nats / token")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png")
    plt.close(figure)
