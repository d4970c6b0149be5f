"""Data: formats, chat template + assistant masks, demo data, batching."""

from sftdist.data.samples import encode_conversation, encode_samples
from sftdist.data.template import IGNORE_INDEX, TemplateSplitError

__all__ = ["IGNORE_INDEX", "TemplateSplitError", "encode_conversation", "encode_samples"]
