"""Prompt generation: captioners fine-tuned to write the prompt, and their scores."""
