"""Data: the on-disk conversation and text formats, and the synthetic multimodal world."""

from kimivl.data.formats import DataError, iter_records, iter_texts, parse_record, write_records
from kimivl.data.world import build_world, ensure_world

__all__ = ["DataError", "build_world", "ensure_world", "iter_records", "iter_texts", "parse_record", "write_records"]
