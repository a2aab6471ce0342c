"""Everything that touches vLLM internals lives here (and in scheduler_patches/)."""
