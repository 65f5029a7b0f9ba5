"""One-row (batch-1 decode) products at real kernel sizes: the forms XLA:CPU runs at memory speed.

    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/one_row_products.py [--shapes 2304x9216 ...]

For each kernel [out, in] (defaults: the 2B's query, gate and down projections, the 9B's
down projection, and the 2B's 256,000-row table) stored float32, bfloat16 or as int8
codes, times x [1, in] (float32) times the kernel transposed in three forms: "plain"
(`x @ cast(W)^T`, the one-row form before issue #31), "kernel first" (`cast(W) @ x`) and
"library" (`layers.one_row_product`, what decode steps run on the CPU). Each form is its own
compiled program (jax.jit, or tf.function(jit_compile=True) under KERAS_BACKEND=tensorflow);
medians of 9 calls; GB/s = kernel bytes / time. docs/performance.md explains the forms.
"""

import argparse
import os
import time

import keras
import numpy as np
from keras import ops

from generate import cpu_flags  # benchmarks/ is on the path when run as a script
from keras_gemma2.model.layers import one_row_product

SHAPES = ("2048x2304", "9216x2304", "2304x9216", "3584x14336", "256000x2304")
FORMS = {
    "plain": lambda x, kernel: ops.matmul(x, ops.transpose(ops.cast(kernel, "float32"))),
    "kernel first": lambda x, kernel: ops.transpose(ops.matmul(ops.cast(kernel, "float32"), ops.transpose(x))),
    "library": one_row_product,
}


def compiled(function):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    raise SystemExit("XLA backends only: KERAS_BACKEND=jax or tensorflow")


def median_ms(function, *args, calls=9):
    ops.convert_to_numpy(function(*args))  # compile
    times = []
    for _ in range(calls):
        begin = time.perf_counter()
        ops.convert_to_numpy(function(*args))
        times.append(time.perf_counter() - begin)
    return float(np.median(times)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="OUTxIN")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| kernel [out, in] | stored | plain ms | kernel first ms | library ms | library GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in args.shapes:
        rows, columns = map(int, shape.split("x"))
        x = ops.convert_to_tensor(rng.standard_normal((1, columns), dtype="float32"))
        values = rng.standard_normal((rows, columns), dtype="float32")
        for stored in ("float32", "bfloat16", "int8"):
            if stored == "int8":
                kernel = np.clip(np.round(values * 32), -127, 127).astype("int8")
            else:
                kernel = values
            kernel = keras.Variable(kernel, dtype=stored, trainable=False)
            times = {name: median_ms(compiled(form), x, kernel.value) for name, form in FORMS.items()}
            size = rows * columns * {"float32": 4, "bfloat16": 2, "int8": 1}[stored]
            print(f"| {rows:,} x {columns:,} | {stored} | {times['plain']:.2f} | {times['kernel first']:.2f} "
                  f"| {times['library']:.2f} | {size / times['library'] / 1e6:.1f} |", flush=True)
            del kernel
    print(f"\n{keras.backend.backend()}, {os.cpu_count()} CPUs, CPU flags: {', '.join(cpu_flags()) or 'none'}")


if __name__ == "__main__":
    main()
