"""Why batch-1 decode stays float32 on this CPU: XLA's one-row products by precision (jax).

    PYTHONPATH=. python benchmarks/low_precision_products.py

Times x @ W^T for one row x and the benchmark model's largest matrix (the 32000 x 768
vocabulary table, [out, in] as the model stores it, kernel first as the decode step
reads it) with W in float32, bfloat16 (math in float32) and int8 (int32 accumulation),
and the same with 8 rows. Fewer weight bytes only pay off if the product runs at
memory speed; the table says whether XLA:CPU does that here.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

ROWS, COLUMNS = 32000, 768


def median_seconds(function, *args, calls=10, repeats=7):
    function(*args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        for _ in range(calls):
            result = function(*args)
        result.block_until_ready()
        times.append((time.perf_counter() - begin) / calls)
    return float(np.median(times))


def main():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((ROWS, COLUMNS), dtype="float32")
    kernels = {
        "float32": jnp.asarray(weights),
        "bfloat16": jnp.asarray(weights, jnp.bfloat16),
        "int8": jnp.asarray(np.clip(np.round(weights * 32), -127, 127).astype("int8")),
    }
    print("| weights | bytes | batch | ms per product | vs float32 | weight GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch in (1, 8):
        rows = rng.standard_normal((batch, 1, COLUMNS), dtype="float32")
        baseline = None
        for name, kernel in kernels.items():
            if name == "int8":
                x = jnp.asarray(np.clip(np.round(rows * 32), -127, 127).astype("int8"))
                accumulate = jnp.int32
            else:
                x = jnp.asarray(rows, kernel.dtype)
                accumulate = jnp.float32
            product = jax.jit(lambda k, x, a=accumulate: jnp.einsum(
                "fd,btd->fbt", k, x, preferred_element_type=a))
            seconds = median_seconds(product, kernel, x)
            baseline = baseline or seconds
            print(f"| {name} | {kernel.nbytes / 1e6:.0f} MB | {batch} | {seconds * 1e3:.2f} | "
                  f"{seconds / baseline:.1f}x | {kernel.nbytes / seconds / 1e9:.1f} |", flush=True)
    print(f"\njax {jax.__version__}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
