"""Paper Table 6 in miniature: a student trained from scratch vs distilled from a teacher.

    KERAS_BACKEND=jax python benchmarks/distillation_demo.py            # full run, ships presets
    KERAS_BACKEND=jax python benchmarks/distillation_demo.py --quick --out /tmp/demo  # smoke test

Corpus: Python's own standard library source, which every machine with Python has. The files are
the top-level modules `<stdlib>/*.py` sorted by name; every 10th file (index % 10 == 9) is held
out. A SentencePiece vocabulary is trained on the training files, then a teacher Gemma 2 (a few
million parameters), then one smaller student twice on the same token budget: from scratch
(next-token loss) and distilled from the teacher (its full next-token distribution at every
token). Held-out perplexity of the three goes to a markdown table and a plot; with --ship the
teacher and the distilled student are written to presets/gemma2_demo_teacher and
presets/gemma2_demo, with the held-out text they were evaluated on.
"""

import argparse
import io
import json
import os
import sys
import sysconfig
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VOCABULARY_SIZE = 2048
TEACHER = dict(vocabulary_size=VOCABULARY_SIZE, num_layers=4, hidden_dim=192, intermediate_dim=576,
               num_query_heads=4, num_key_value_heads=2, head_dim=48, query_pre_attn_scalar=48,
               sliding_window_size=64, max_sequence_length=512)
STUDENT = dict(TEACHER, num_layers=2, hidden_dim=96, intermediate_dim=288, num_query_heads=2,
               num_key_value_heads=1)


def stdlib_files():
    """The fixed corpus: top-level stdlib modules, sorted; every 10th one held out."""
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    paths = [os.path.join(root, n) for n in names]
    train = [p for i, p in enumerate(paths) if i % 10 != 9]
    held_out = [p for i, p in enumerate(paths) if i % 10 == 9]
    return train, held_out


def read(paths):
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(texts, path):
    """A Gemma-style SentencePiece model: same special pieces, no normalisation, digits split."""
    import sentencepiece as spm

    from keras_gemma2.io.atomic import atomic_write

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCABULARY_SIZE,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n", "    "],
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=True, character_coverage=1.0, num_threads=2,
        input_sentence_size=200000, shuffle_input_sentence=True, minloglevel=2,
        allow_whitespace_only_pieces=True,
    )
    with atomic_write(path) as f:
        f.write(model.getvalue())
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distillation"))
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=60000, help="held-out tokens scored")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny models (smoke test)")
    parser.add_argument("--ship", action="store_true", help="write the presets into presets/")
    args = parser.parse_args(argv)

    import keras

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config, Gemma2Tokenizer
    from keras_gemma2.training import data
    from keras_gemma2.training import trainer
    from keras_gemma2.training.distillation import Distiller

    teacher_arch, student_arch = dict(TEACHER), dict(STUDENT)
    if args.quick:
        args.teacher_steps = args.student_steps = 3
        args.batch_size, args.sequence_length, args.eval_tokens = 2, 32, 2000
        teacher_arch.update(num_layers=2, hidden_dim=32, intermediate_dim=48)
        student_arch.update(num_layers=1, hidden_dim=16, intermediate_dim=24, head_dim=16,
                            query_pre_attn_scalar=16)
    os.makedirs(args.out, exist_ok=True)
    began = time.time()
    train_files, held_out_files = stdlib_files()
    train_texts, held_out_texts = read(train_files), read(held_out_files)
    if args.quick:
        train_texts, held_out_texts = train_texts[:20], held_out_texts[:3]
    tokenizer = Gemma2Tokenizer(train_tokenizer(train_texts, os.path.join(args.out, "tokenizer.model")))
    stream = data.token_stream(tokenizer, train_texts)
    held_out_stream = data.token_stream(tokenizer, held_out_texts)[: args.eval_tokens]
    eval_batches = data.evaluation_batches(held_out_stream, 8, args.sequence_length)
    print(f"corpus: {len(train_files)} training files ({len(stream):,} tokens), "
          f"{len(held_out_files)} held out (scoring {len(held_out_stream):,} tokens)", flush=True)

    def new_model(arch, seed):
        keras.utils.set_random_seed(seed)
        return Gemma2CausalLM(Gemma2Backbone(Gemma2Config(**arch)), tokenizer=tokenizer)

    def fit(model, steps, label):
        started = time.time()
        history = trainer.train(
            model, stream, steps, args.batch_size, args.sequence_length,
            eval_batches=eval_batches, eval_every=max(steps // 5, 1),
        )
        print(f"{label}: {time.time() - started:.0f} s", flush=True)
        return history

    def optimizer(steps):
        schedule = keras.optimizers.schedules.CosineDecay(3e-3, steps, warmup_target=None)
        return keras.optimizers.AdamW(schedule, weight_decay=0.01)

    teacher = new_model(teacher_arch, 0)
    teacher.compile(optimizer=optimizer(args.teacher_steps))
    histories = {"teacher": fit(teacher, args.teacher_steps, "teacher")}

    scratch = new_model(student_arch, 1)
    scratch.compile(optimizer=optimizer(args.student_steps))
    histories["student from scratch"] = fit(scratch, args.student_steps, "student from scratch")

    distilled = new_model(student_arch, 1)  # the same initial weights as the scratch student
    distiller = Distiller(teacher, distilled)
    distiller.compile(optimizer=optimizer(args.student_steps))
    histories["student distilled"] = fit(distiller, args.student_steps, "student distilled")

    tokens_seen = args.student_steps * args.batch_size * args.sequence_length
    rows = []
    for label, model in (("teacher", teacher), ("student from scratch", scratch), ("student distilled", distilled)):
        rows.append((label, model.count_params(), trainer.perplexity(model, eval_batches)))
    elapsed = time.time() - began
    table = [
        f"command: KERAS_BACKEND={keras.backend.backend()} python benchmarks/distillation_demo.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        f"corpus: Python {sys.version.split()[0]} stdlib top-level modules; "
        f"{len(stream):,} training tokens, {len(held_out_stream):,} held-out tokens scored",
        f"students: {args.student_steps} steps x {args.batch_size} x {args.sequence_length} = "
        f"{tokens_seen:,} tokens each; teacher: {args.teacher_steps} steps",
        "",
        "| model | parameters | held-out perplexity |",
        "|---|---|---|",
        *[f"| {label} | {params:,} | {value:.3f} |" for label, params, value in rows],
        "",
        f"run time: {elapsed / 60:.1f} min on this machine ({os.cpu_count()} cores)",
    ]
    print("\n".join(table))
    from keras_gemma2.io.atomic import atomic_write

    with atomic_write(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    with atomic_write(os.path.join(args.out, "histories.json"), "w") as f:
        json.dump(histories, f)
    plot(histories, os.path.join(args.out, "held_out_perplexity.png"))

    if args.ship:
        held_out_text = "\n".join(held_out_texts)
        for name, model, value in (("gemma2_demo_teacher", teacher, rows[0][2]), ("gemma2_demo", distilled, rows[2][2])):
            ship(name, model, value, held_out_text[:200000], args)


def plot(histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_gemma2.io.atomic import atomic_write

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, history in histories.items():
        evals = [r for r in history if "eval_perplexity" in r]
        axis.plot([r["step"] for r in evals], [r["eval_perplexity"] for r in evals], "o-", label=label)
    axis.set_xlabel("training step")
    axis.set_ylabel("held-out perplexity")
    axis.set_yscale("log")
    axis.set_title("Python stdlib: distillation vs training from scratch")
    axis.legend()
    figure.tight_layout()
    with atomic_write(path) as f:
        figure.savefig(f, format="png")
    plt.close(figure)


def ship(name, model, value, held_out_text, args):
    """Write presets/<name>/ (bfloat16 weights) and presets/<name>.json."""
    import shutil

    import keras

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
    from keras_gemma2.io.atomic import atomic_write
    from keras_gemma2.training.trainer import perplexity
    from keras_gemma2.training import data

    directory = os.path.join(ROOT, "presets", name)
    shutil.rmtree(directory, ignore_errors=True)
    small = Gemma2CausalLM(Gemma2Backbone(model.config, dtype="bfloat16"), tokenizer=model.tokenizer)
    small.set_weights([keras.ops.convert_to_numpy(w) for w in model.get_weights()])
    small.save_to_preset(directory)
    with atomic_write(os.path.join(directory, "held_out.txt"), "w") as f:
        f.write(held_out_text)
    # The value the test checks: the shipped (bfloat16) weights, loaded back as float32.
    from keras_gemma2 import from_preset

    reloaded = from_preset(directory)
    stream = data.token_stream(reloaded.tokenizer, [held_out_text])[:20000]
    shipped_value = perplexity(reloaded, data.evaluation_batches(stream, 8, 128))
    entry = {
        "name": name,
        "description": (
            f"Demo Gemma 2 ({model.count_params():,} parameters) trained on Python's standard "
            "library source" + (", distilled from gemma2_demo_teacher" if name == "gemma2_demo" else "")
            + "; ships with the package."
        ),
        "config": model.config.to_dict(),
        "local": name,
        "handles": [],
        "held_out_perplexity": round(shipped_value, 4),
        "held_out_tokens": int(len(stream)),
        "trained_with": " ".join(sys.argv[1:]),
    }
    with atomic_write(os.path.join(ROOT, "presets", f"{name}.json"), "w") as f:
        json.dump(entry, f, indent=2)
        f.write("\n")
    print(f"shipped {name}: held-out perplexity {shipped_value:.4f} (float32 run: {value:.4f})")


if __name__ == "__main__":
    main()
