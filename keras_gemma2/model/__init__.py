"""The Gemma 2 network: layers, the backbone with its one cached forward, the KV-cache layout, quantization and LoRA."""
