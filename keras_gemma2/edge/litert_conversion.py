"""SavedModel -> LiteRT (.tflite) conversion, in this process or (large models) a child."""

import json
import os
import subprocess
import sys

# Above this the flatbuffer's 2 GB limit needs weights stored after it (buffer offsets).
_LARGE_MODEL_BYTES = 1 << 30


def _directory_bytes(path):
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
    )


def convert_file(saved_model_dir, output_path, signature_keys, quantization, buffer_offsets=False):
    """SavedModel -> .tflite; above 1 GB of weights in a child process.

    The converter never frees its constants (MLIR attributes), so a large
    conversion runs in a process of its own that returns all of it on exit.
    `buffer_offsets`: tensor data after the flatbuffer even for a small model
    (the layout of every large one), as the stitched export's template always is.
    """
    if _directory_bytes(saved_model_dir) <= _LARGE_MODEL_BYTES:
        weight_bytes = 1 << 62 if buffer_offsets else 0
        _write_litert(saved_model_dir, output_path, signature_keys, quantization, weight_bytes)
        return
    arguments = json.dumps({
        "saved_model_dir": saved_model_dir, "output_path": output_path,
        "signature_keys": list(signature_keys), "quantization": quantization, "weight_bytes": 1 << 62,
    })
    code = (
        "import json; from keras_gemma2.edge.litert_conversion import _write_litert; "
        f"_write_litert(**json.loads({arguments!r}))"
    )
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        killed = f" (killed by signal {-result.returncode}: out of memory?)" if result.returncode < 0 else ""
        raise RuntimeError(
            f"The TFLite conversion process failed with exit status {result.returncode}{killed}:\n"
            + result.stderr[-4000:]
        )


def _write_litert(saved_model_dir, output_path, signature_keys, quantization, weight_bytes):
    flatbuffer = convert_to_litert(saved_model_dir, signature_keys, quantization, weight_bytes)
    with open(output_path, "wb") as f:
        f.write(flatbuffer)


def convert_to_litert(saved_model_dir, signature_keys, quantization, weight_bytes):
    """SavedModel -> TFLite flatbuffer bytes with builtin ops only.

    int8 is the converter's dynamic-range quantization: per-channel int8
    weights, float32 activations (hybrid kernels). int4 is produced from the
    float file by `quantize_int4`.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=signature_keys
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if weight_bytes > _LARGE_MODEL_BYTES:
        converter._experimental_use_buffer_offset = True  # weights after the 2 GB flatbuffer
    return converter.convert()


def quantize_int4(path):
    """Rewrite a float .tflite in place with int4 channel-wise weights (ai-edge-quantizer)."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as error:
        raise ImportError(
            "int4 export needs ai-edge-quantizer: pip install ai-edge-quantizer "
            "(or keras-gemma2[export])."
        ) from error
    engine = quantizer.Quantizer(path, recipe.dynamic_wi4_afp32())
    result = engine.quantize(enable_progress_report=False)
    temporary = path + ".int4"
    result.export_model(temporary, overwrite=True)
    os.replace(temporary, path)
