"""Adapters in and out: safetensors files, orbax checkpoints, PEFT directories."""
