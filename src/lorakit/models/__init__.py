"""Base models and tokenizers: loading by hub id or path, and the embedded base model's files."""

from lorakit.models.loading import (EMBEDDED_MODEL, EMBEDDED_NAME, HUB_ID, PRECISIONS, load_model, load_tokenizer, resolve_model_path,
                                    stop_token_ids)

__all__ = ["EMBEDDED_MODEL", "EMBEDDED_NAME", "HUB_ID", "PRECISIONS", "load_model", "load_tokenizer", "resolve_model_path", "stop_token_ids"]
