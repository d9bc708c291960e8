"""Helpers shared by every layer of the package (no verl import): crash-safe file writes, the
character-level tokenizer of the tiny models, reading values out of composed configs."""
