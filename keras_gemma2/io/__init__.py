"""File writing that never leaves half a file, and safetensors reading and writing."""
