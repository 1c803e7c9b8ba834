"""The data engine: image-caption pairs -> LLM-written interleaved conversations -> filtered stage-2 data."""
