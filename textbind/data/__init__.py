"""Conversation format, tokenisation with caption branches, datasets and batching."""
