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

from keras_gemma2.io import atomic, safetensors_files
from keras_gemma2.io.atomic import atomic_write
from keras_gemma2.training.data import batch_at

LATEST = "latest"


def trained_model(model):
    """The model whose weights change: the student of a Distiller, else the model."""
    return getattr(model, "student", model)


# ---- checkpoints ---------------------------------------------------------------
def save_checkpoint(model, directory, step, history):
    """Write step_NNNNNNN/ (weights, optimizer, state), then point `latest` at it."""
    name = f"step_{step:07d}"
    final = os.path.join(directory, name)
    staging = atomic.track_staging(os.path.join(directory, f".{name}.partial"))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    student = trained_model(model)
    tensors = {f"model/{v.path}": _numpy(v) for v in student.weights}
    tensors.update({_optimizer_key(v): _numpy(v) for v in model.optimizer.variables})
    safetensors_files.write_file(os.path.join(staging, "state.safetensors"), tensors)
    state = {"step": step, "config": student.config.to_dict(), "history": history}
    with atomic_write(os.path.join(staging, "state.json"), "w") as f:
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    atomic.forget_staging(staging)
    with atomic_write(os.path.join(directory, LATEST), "w") as f:
        f.write(name)
    for other in os.listdir(directory):  # keep only the newest complete checkpoint
        if other.startswith("step_") and other != name:
            shutil.rmtree(os.path.join(directory, other), ignore_errors=True)


def _read_state(directory):
    """(folder, state.json contents) of the checkpoint `latest` names, or None; clear errors."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    folder = os.path.join(directory, name)
    fix = (f"restore that checkpoint folder, or delete {pointer} (and the step_* folders) "
           "to start from step 0, or use a new checkpoint directory")
    missing = [part for part in ("state.json", "state.safetensors")
               if not os.path.isfile(os.path.join(folder, part))]
    if not name.startswith("step_") or missing:
        raise ValueError(
            f"The checkpoint pointer {pointer} names {name!r}, but "
            f"{os.path.join(folder, missing[0]) if missing else folder} is not a checkpoint "
            f"({fix})."
        )
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        int(state["step"]), state["config"], state["history"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"The checkpoint {folder} is damaged (state.json: {error}) ({fix})."
        ) from error
    return folder, state


def checkpoint_step(directory):
    """The step of the newest checkpoint in `directory`, or None if it holds none."""
    if not directory or not os.path.isdir(directory):
        return None
    found = _read_state(directory)
    return None if found is None else int(found[1]["step"])


def load_checkpoint(model, directory):
    """Restore the newest checkpoint into `model` (compiled); returns its state or None."""
    found = _read_state(directory)
    if found is None:
        return None
    folder, state = found
    student = trained_model(model)
    if state["config"] != student.config.to_dict():
        raise ValueError(
            f"{directory} holds checkpoints of another architecture "
            f"({_config_difference(state['config'], student.config.to_dict())}); "
            "use a new checkpoint directory or the matching model."
        )
    stored = safetensors_files.SafetensorsFile(os.path.join(folder, "state.safetensors"))
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
    stop_requested=None,
):
    """Train `model` (compiled) for `steps` steps; resume from `checkpoint_dir` if possible.

    `batches`: a token stream (random windows of it are drawn, a pure function
    of the step) or a callable `step -> batch dict` (e.g. an offline
    distillation store).

    `steps` is the total: a resumed run continues up to it. Held-out
    perplexity is measured every `eval_every` steps and at the last step
    (only at the last one when `eval_every` is None).

    Every argument, the data length and the checkpoint directory (writable,
    its checkpoint not beyond `steps`) are checked before the first step.

    `stop_requested`: a callable checked after every step (the command line's
    Ctrl-C); when it returns True the run checkpoints the finished steps (if
    `checkpoint_dir`) and raises TrainingStopped.

    Returns the history: a list of {"step", "loss", "tokens_per_second"} and
    {"step", "eval_perplexity"} records.
    """
    log = log or sys.stdout
    student = trained_model(model)
    _check_count("steps", steps)
    _check_count("batch_size", batch_size)
    _check_count("sequence_length", sequence_length, minimum=2)
    _check_count("checkpoint_every", checkpoint_every)
    if eval_every is not None:
        _check_count("eval_every", eval_every)
    _check_count("seed", seed, minimum=0)
    if getattr(model, "optimizer", None) is None:
        raise ValueError("The model is not compiled; call model.compile(optimizer=...) before train().")
    if sequence_length > student.config.max_sequence_length:
        raise ValueError(
            f"sequence length {sequence_length} exceeds the model's max_sequence_length "
            f"{student.config.max_sequence_length}."
        )
    if callable(batches):
        _check_store_shape(batches, batch_size, sequence_length)
    elif len(batches) <= sequence_length:
        raise ValueError(
            f"The data has {len(batches)} tokens, fewer than one sequence of {sequence_length}; "
            "add data or lower the sequence length."
        )
    history, start = [], 0
    if checkpoint_dir:
        atomic.check_writable_directory(checkpoint_dir, "checkpoint_dir")
        saved = checkpoint_step(checkpoint_dir)
        if saved is not None and saved > steps:
            raise ValueError(
                f"checkpoint_dir {checkpoint_dir} holds a checkpoint at step {saved}, beyond "
                f"steps={steps} (steps is the total; pass steps >= {saved} to continue it, or use "
                "a new checkpoint directory)."
            )
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
        rate = tokens / max(time.time() - began, 1e-6)
        history.append({"step": step + 1, "loss": float(loss), "tokens_per_second": rate})
        _progress(step + 1, steps, float(loss), rate, log)
        if eval_batches and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            value = perplexity(student, eval_batches)
            history.append({"step": step + 1, "eval_perplexity": value})
            print(f"\nstep {step + 1}: held-out perplexity {value:.3f}", file=log, flush=True)
        stopping = stop_requested is not None and stop_requested() and step + 1 < steps
        if checkpoint_dir and ((step + 1) % checkpoint_every == 0 or step + 1 == steps or stopping):
            save_checkpoint(model, checkpoint_dir, step + 1, history)
        if stopping:
            print(file=log, flush=True)
            raise TrainingStopped(step + 1, steps, history, checkpoint_dir)
    print(file=log, flush=True)
    return history


class TrainingStopped(Exception):
    """Training stopped on request after `step` of `steps` (checkpointed in `checkpoint_dir`, if any)."""

    def __init__(self, step, steps, history, checkpoint_dir):
        where = f"; checkpoint saved in {checkpoint_dir}" if checkpoint_dir else ""
        super().__init__(f"training stopped after step {step} of {steps}{where}")
        self.step, self.steps, self.history, self.checkpoint_dir = step, steps, history, checkpoint_dir


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r} (pass e.g. {name}={max(minimum, 1) * 8})."
        )


def _check_store_shape(batches, batch_size, sequence_length):
    """A store (anything with a `manifest`) must hold batches of the shape asked for."""
    manifest = getattr(batches, "manifest", None)
    if not isinstance(manifest, dict):
        return
    stored = {"batch_size": manifest.get("batch_size"), "sequence_length": manifest.get("sequence_length")}
    asked = {"batch_size": batch_size, "sequence_length": sequence_length}
    if stored != asked:
        raise ValueError(
            "The teacher store holds batches of "
            + ", ".join(f"{k}={stored[k]}" for k in stored)
            + " but training asks for "
            + ", ".join(f"{k}={asked[k]}" for k in asked)
            + " (pass the store's values, or build a new store)."
        )


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
