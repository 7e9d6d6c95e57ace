"""Model families built here, offline: the tiny char-level Qwen2 family and SmolLM2 specialists (SPEC §9)."""
