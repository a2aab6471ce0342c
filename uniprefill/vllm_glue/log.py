"""A logger under vLLM's "vllm" tree, so plugin lines get vLLM's format and process prefix."""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger(f"vllm.{module}")
