"""What lies on disk: Hugging Face folders, safetensors, GGUF, Orbax train states, assets."""
