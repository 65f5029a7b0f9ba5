"""SavedModel -> LiteRT (.tflite) conversion, in this process or (large models) a child."""

import json
import os
import subprocess
import sys

from keras_gemma2 import cli_startup

# A TensorFlow child that only loads, traces and converts: with oneDNN's ops on, TensorFlow
# allocates through a pool that never returns memory (assigning the 2B's 2.4 GB embedding
# keeps the old buffer too), and it computes nothing that oneDNN would speed up.
CHILD_ENVIRONMENT = {"KERAS_BACKEND": "tensorflow", "TF_ENABLE_ONEDNN_OPTS": "0"}

# Set in a child's environment to the exporting process's id (die_with_parent).
PARENT_VARIABLE = "KERAS_GEMMA2_EXPORT_PARENT"

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
        "import json; from keras_gemma2.edge import litert_conversion as c; c.die_with_parent(); "
        f"c._write_litert(**json.loads({arguments!r}))"
    )
    environment = {**os.environ, **CHILD_ENVIRONMENT, PARENT_VARIABLE: str(os.getpid())}
    process = subprocess.Popen([sys.executable, "-c", code], env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, errors="replace")
    # It writes only into this export's staging folder: if the export is stopped, so is it.
    with cli_startup.on_abrupt_exit(process.kill):
        try:
            _, errors = process.communicate()
        finally:
            if process.poll() is None:  # interrupted here (a notebook's KeyboardInterrupt)
                process.kill()
                process.wait()
    if process.returncode != 0:
        status = process.returncode
        killed = f" (killed by signal {-status}: out of memory?)" if status < 0 else ""
        raise RuntimeError(f"The TFLite conversion process failed with exit status {status}{killed}:\n"
                           + errors[-4000:])


def die_with_parent():
    """Called first in an export's child (the TensorFlow exporter, the converter): Linux ends it
    when the exporting process dies.

    A killed export then leaves no orphan still converting in the background. The
    SIGTERM lets the child remove its staging folder (cli_startup's abrupt exit);
    after a SIGKILL the next export removes it (atomic.staging_directory).
    """
    parent = os.environ.pop(PARENT_VARIABLE, None)
    if parent is None:  # run by hand, not by an export
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the child finishes on its own
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        sys.exit(1)


def _write_litert(saved_model_dir, output_path, signature_keys, quantization, weight_bytes):
    flatbuffer = convert_to_litert(saved_model_dir, signature_keys, quantization, weight_bytes)
    with open(output_path, "wb") as f:
        f.write(flatbuffer)


def convert_to_litert(saved_model_dir, signature_keys, quantization, weight_bytes):
    """SavedModel -> TFLite flatbuffer bytes with builtin ops only.

    int8 is the converter's dynamic-range quantization: per-channel int8
    weights, float32 activations (hybrid kernels). There is no int4 here: an
    int4 export converts an int8 template and `litert_weights.stitch` writes
    the int4 weights into it.
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

