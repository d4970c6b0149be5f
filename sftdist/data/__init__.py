"""Data: formats, chat template + assistant masks, demo data, batching."""

from sftdist.data.template import IGNORE_INDEX, TemplateSplitError, encode_conversation, encode_samples

__all__ = ["IGNORE_INDEX", "TemplateSplitError", "encode_conversation", "encode_samples"]
