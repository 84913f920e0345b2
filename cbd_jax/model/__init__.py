"""The model: its config, the decoder, cached generation and the device mesh."""
