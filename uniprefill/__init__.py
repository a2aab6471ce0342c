"""UniPrefill: block-wise token pruning during prefill, as a vLLM plugin.

Importing this package imports no vLLM; the plugin entry point is `uniprefill.plugin:register`.
"""

__version__ = "0.1.0"
