"""Export a keras_gemma2 Gemma 2 preset with Google's litert-torch (the peer).

Benchmark-only: this script runs in its own virtual environment,
`.venv-litert-torch`, and nothing in `keras_gemma2` imports it. It builds
litert-torch's own Gemma 2 re-authoring (`litert_torch.generative.examples.
gemma.gemma2.Gemma2`) with a `ModelConfig` read from the preset's
transformers `config.json`, loads the preset's `model.safetensors` through
litert-torch's loader (it maps the transformers tensor names), and converts it
with litert-torch's converter to a multi-signature .tflite (`prefill_<n>` for
each prefill length, plus `decode`), with the attention mask built inside the
graph. With `--litertlm` it also bundles that .tflite, the SentencePiece
tokenizer and LLM metadata into a .litertlm with litert-torch's own builder.

Create the environment (from the repository root; torch is the local CPU
wheel, tensorflow is needed by litert-torch but not declared by it):

    python3.11 -m venv .venv-litert-torch
    .venv-litert-torch/bin/pip install --upgrade pip
    .venv-litert-torch/bin/pip install "litert-torch==0.10.*" "torch==2.13.0" \
        "tensorflow==2.21.0" safetensors sentencepiece

Run:

    .venv-litert-torch/bin/python benchmarks/litert_torch_export.py \
        --preset-dir presets/gemma2_demo_teacher \
        --output /tmp/peer/gemma2_demo_teacher_q8.tflite \
        --litertlm /tmp/peer/gemma2_demo_teacher_q8.litertlm \
        --cache-length 512 --prefill-lengths 128 --quantize int8
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

QUANTIZE = {"int8": "dynamic_int8", "none": "none"}
KV_LAYOUTS = ("transposed", "default")


def model_config(hf, max_seq_len):
    """litert-torch `ModelConfig` for a transformers Gemma2 `config.json`."""
    import litert_torch.generative.layers.model_config as cfg

    activation = hf.get("hidden_activation") or hf.get("hidden_act")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Unsupported hidden activation: {activation!r}")
    head_dim = hf["head_dim"]
    scalar = hf.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        # litert-torch's attention scales queries by 1/sqrt(head_dim).
        raise ValueError(
            f"query_pre_attn_scalar ({scalar}) != head_dim ({head_dim}) is not "
            "expressible in litert-torch's Gemma2 attention")
    norm = cfg.NormalizationConfig(
        type=cfg.NormalizationType.RMS_NORM,
        epsilon=hf["rms_norm_eps"],
        zero_centered=True,
    )
    ff = cfg.FeedForwardConfig(
        type=cfg.FeedForwardType.GATED,
        activation=cfg.ActivationConfig(cfg.ActivationType.GELU_TANH),
        intermediate_size=hf["intermediate_size"],
        pre_ff_norm_config=norm,
        post_ff_norm_config=norm,
    )

    def block(idx):
        attn = cfg.AttentionConfig(
            num_heads=hf["num_attention_heads"],
            head_dim=head_dim,
            num_query_groups=hf["num_key_value_heads"],
            rotary_base=int(hf.get("rope_theta", 10000)),
            rotary_percentage=1.0,
            qkv_transpose_before_split=True,
            # transformers safetensors hold separate q/k/v (not interleaved).
            qkv_fused_interleaved=False,
            logit_softcap=hf.get("attn_logit_softcapping"),
            sliding_window_size=hf["sliding_window"],
            # Gemma 2: even layers slide, odd layers are global.
            attn_type=(cfg.AttentionType.LOCAL_SLIDING if idx % 2 == 0
                       else cfg.AttentionType.GLOBAL),
        )
        return cfg.TransformerBlockConfig(
            attn_config=attn,
            ff_config=ff,
            pre_attention_norm_config=norm,
            post_attention_norm_config=norm,
        )

    num_layers = hf["num_hidden_layers"]
    dim = hf["hidden_size"]
    return cfg.ModelConfig(
        vocab_size=hf["vocab_size"],
        num_layers=num_layers,
        max_seq_len=max_seq_len,
        embedding_dim=dim,
        embedding_scale=dim ** 0.5,
        block_configs=[block(i) for i in range(num_layers)],
        final_norm_config=norm,
        lm_head_use_bias=False,
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )


def build_model(preset_dir, config, mask_cache_size):
    """litert-torch's Gemma2 with the preset's transformers safetensors."""
    from litert_torch.generative.examples.gemma import gemma2
    from litert_torch.generative.utilities import model_builder

    return model_builder.build_decoder_only_model(
        checkpoint_path=preset_dir,
        config=config,
        tensor_names=gemma2.TENSOR_NAMES_SEP_QKV,
        model_class=gemma2.Gemma2,
        mask_cache_size=mask_cache_size,
    )


def stop_token_ids(tokenizer_path, eos_id):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ids = [eos_id]
    end_of_turn = sp.piece_to_id("<end_of_turn>")
    if end_of_turn != sp.unk_id() and end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset-dir", required=True,
                        help="folder with config.json, model.safetensors, tokenizer.model")
    parser.add_argument("--output", required=True, help="the .tflite to write")
    parser.add_argument("--cache-length", type=int, default=None,
                        help="KV cache length (default: max_position_embeddings)")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[128])
    parser.add_argument("--quantize", choices=sorted(QUANTIZE), default="int8",
                        help="int8: litert-torch's dynamic_int8 recipe")
    parser.add_argument("--kv-layout", choices=KV_LAYOUTS, default="transposed",
                        help="KV cache layout (litert-torch's Gemma2 example "
                             "defaults to transposed)")
    parser.add_argument("--litertlm", default=None,
                        help="also bundle a .litertlm at this path")
    args = parser.parse_args(argv)

    preset_dir = os.path.abspath(args.preset_dir)
    with open(os.path.join(preset_dir, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "gemma2":
        raise SystemExit(f"not a Gemma2 config: model_type={hf.get('model_type')!r}")
    cache_length = args.cache_length or hf["max_position_embeddings"]
    if max(args.prefill_lengths) > cache_length:
        raise SystemExit("prefill lengths must not exceed the cache length")

    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import converter
    from litert_torch.generative.utilities import export_config as export_cfg
    from litert_torch.generative.utilities import litertlm_builder

    torch.manual_seed(0)
    config = model_config(hf, max(hf["max_position_embeddings"], cache_length))
    # mask_cache_size > 0: the causal / sliding-window masks live in the graph.
    model = build_model(preset_dir, config, mask_cache_size=cache_length)

    export_config = export_cfg.ExportConfig()
    export_config.mask_as_input = False
    export_config.kvcache_layout = (kv_utils.KV_LAYOUT_TRANSPOSED
                                    if args.kv_layout == "transposed"
                                    else kv_utils.KV_LAYOUT_DEFAULT)

    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        written = converter.convert_to_tflite(
            model,
            output_path=workdir,
            output_name_prefix="gemma2",
            prefill_seq_len=list(args.prefill_lengths),
            kv_cache_max_len=cache_length,
            quantize=QUANTIZE[args.quantize],
            export_config=export_config,
        )
        shutil.move(written, output)
    print(f"wrote {output} ({os.path.getsize(output)} bytes)")

    if args.litertlm:
        litertlm = os.path.abspath(args.litertlm)
        tokenizer = os.path.join(preset_dir, "tokenizer.model")
        with tempfile.TemporaryDirectory() as workdir:
            staged = os.path.join(workdir, "model.tflite")
            shutil.copyfile(output, staged)
            litertlm_builder.build_litertlm(
                tflite_model_path=staged,
                workdir=workdir,
                output_path=workdir,
                context_length=cache_length,
                tokenizer_model_path=tokenizer,
                start_token_id=hf.get("bos_token_id", 2),
                stop_token_ids=stop_token_ids(tokenizer, hf.get("eos_token_id", 1)),
                user_prompt_prefix="<start_of_turn>user\n",
                user_prompt_suffix="<end_of_turn>\n",
                model_prompt_prefix="<start_of_turn>model\n",
                model_prompt_suffix="<end_of_turn>\n",
                llm_model_type="generic",
            )
            os.makedirs(os.path.dirname(litertlm), exist_ok=True)
            shutil.move(os.path.join(workdir, "model.litertlm"), litertlm)
        print(f"wrote {litertlm} ({os.path.getsize(litertlm)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
