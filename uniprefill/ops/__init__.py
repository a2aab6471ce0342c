"""UniPrefill's operators. Imports only torch (and triton where present), never vLLM."""

from uniprefill.ops.select import Selection, SelectionRule, available_backends, select_tokens

__all__ = ["Selection", "SelectionRule", "available_backends", "select_tokens"]
