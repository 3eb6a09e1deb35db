"""Checkpoint stage: a Hugging Face directory, hub id or GGUF file into the one model definition."""
