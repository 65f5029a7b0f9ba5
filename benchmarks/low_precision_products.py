"""Which form of a low-precision weight product XLA:CPU runs fast here (jax), by rows.

    PYTHONPATH=. python benchmarks/low_precision_products.py

Times x @ W^T for the benchmark model's largest matrix (the 32000 x 768 vocabulary table,
[out, in] as the model stores it) in the forms `layers.rows_times_transposed` and
`Projection._int8_call` choose between: one row as a 2-D product, 8 rows kernel first, 64
rows (a prefill chunk) as the plain einsum; weights float32, bfloat16 (inputs bfloat16),
int8 x int8 codes summed in int32 (Keras' int8 product) and the same codes cast to float32
in the product. Each form runs once as its own program ("plain": what a decode step driven
from the host runs) and inside a jitted 8-step loop ("in loop": what the compiled decode
loop runs). Fewer weight bytes only pay off in a form XLA runs at memory speed; the table
says which forms do on this CPU (flags printed below it).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from generate import cpu_flags  # benchmarks/ is on the path when run as a script

ROWS, COLUMNS = 32000, 768
LOOP_STEPS = 8


def median_ms(function, *args, calls=5, repeats=5):
    function(*args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        for _ in range(calls):
            result = function(*args)
        result.block_until_ready()
        times.append((time.perf_counter() - begin) / calls)
    return float(np.median(times)) * 1e3


def product(x, kernel, accumulate):
    """x [b, s, in] @ kernel^T in the form the model uses for that many rows."""
    b, s, _ = x.shape
    if b * s == 1:
        out = jnp.matmul(x.reshape(1, COLUMNS), kernel.T, preferred_element_type=accumulate)
        return out.reshape(1, 1, ROWS)
    if s <= 17:
        return jnp.einsum("fd,btd->fbt", kernel, x, preferred_element_type=accumulate).transpose(1, 2, 0)
    return jnp.einsum("btd,fd->btf", x, kernel, preferred_element_type=accumulate)


def codes(values):
    return jnp.clip(jnp.round(values * 32), -127, 127)


# name -> (kernel key, product of float32 inputs x and that kernel)
FORMS = {
    "float32": ("float32", lambda x, k: product(x, k, jnp.float32)),
    "bfloat16": ("bfloat16", lambda x, k: product(x.astype(jnp.bfloat16), k, jnp.float32)),
    "int8 x int8 -> int32": ("int8", lambda x, k: product(codes(x).astype(jnp.int8), k, jnp.int32)),
    "int8 codes as float32": ("int8", lambda x, k: product(codes(x), k.astype(jnp.float32), jnp.float32)),
}


def main():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((ROWS, COLUMNS), dtype="float32")
    kernels = {
        "float32": jnp.asarray(weights),
        "bfloat16": jnp.asarray(weights, jnp.bfloat16),
        "int8": jnp.asarray(np.clip(np.round(weights * 32), -127, 127).astype("int8")),
    }
    print("| rows (batch x positions) | weights | plain ms | in loop ms per step | plain vs float32 |")
    print("|---|---|---:|---:|---:|")
    for batch, positions in ((1, 1), (8, 1), (1, 64)):
        x = jnp.asarray(rng.standard_normal((batch, positions, COLUMNS), dtype="float32"))
        baseline = None
        for name, (key, form) in FORMS.items():
            plain = jax.jit(form)

            def loop(x, kernel, form=form):
                def body(_, total):  # each step depends on the last, as decode steps do
                    return total + form(x + total[0] * 0, kernel).astype(jnp.float32).sum()
                return jax.lax.fori_loop(0, LOOP_STEPS, body, jnp.zeros((1,), jnp.float32))

            plain_ms = median_ms(plain, x, kernels[key])
            loop_ms = median_ms(jax.jit(loop), x, kernels[key], calls=1) / LOOP_STEPS
            baseline = baseline or plain_ms
            print(f"| {batch} x {positions} | {name} | {plain_ms:.2f} | {loop_ms:.2f} | "
                  f"{baseline / plain_ms:.2f}x |", flush=True)
    print(f"\njax {jax.__version__}, {os.cpu_count()} CPUs, CPU flags: {', '.join(cpu_flags()) or 'none'}")


if __name__ == "__main__":
    main()
