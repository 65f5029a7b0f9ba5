"""transformers' Gemma2ForCausalLM as the numerical reference, on tiny random weights."""

import numpy as np

from keras_gemma2.checkpoints import transformers_format


def random_hf_model(config, seed=0, scale=0.3):
    """A transformers Gemma 2 with EVERY weight random (norm scales too), float32, eager attention."""
    import torch
    import transformers

    hf_config = transformers.Gemma2Config(**transformers_format.config_to_hf(config), attn_implementation="eager")
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def hf_logits(model, token_ids, padding_mask=None):
    import torch

    token_ids = torch.tensor(np.asarray(token_ids), dtype=torch.long)
    mask = None if padding_mask is None else torch.tensor(np.asarray(padding_mask), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=token_ids, attention_mask=mask).logits.float().numpy()


def save_hf_checkpoint(model, directory, tokenizer_path=None, max_shard_size="5GB"):
    """What a user downloads from the Hub: config.json, safetensors, tokenizer.model."""
    import shutil

    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer_path is not None:
        shutil.copy(tokenizer_path, f"{directory}/tokenizer.model")
    return directory
