"""Look inside a model: attention heads, KV-cache memory, thinking traces (data first; figures.py draws)."""
