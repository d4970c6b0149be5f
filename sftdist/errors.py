"""The exceptions that mean "the user's input is wrong": each message names the key, file, record or value.

The entry point turns these into one clear line and exit status 2; any other exception is a bug and
keeps its traceback.
"""


class InputError(ValueError):
    """A mistake in what the user gave us (config, files, records); the message says where."""


class ConfigError(InputError):
    """A bad configuration value: the message names the key and the value."""


class DataError(InputError):
    """A data file or record that cannot be used: the message names the file and line or record."""


class TemplateSplitError(InputError):
    """The chat template cannot render a conversation (``reason="template_error"``) or cannot be split into
    prompt and assistant spans reliably (``reason="template_split"``)."""

    def __init__(self, message: str, reason: str = "template_split"):
        super().__init__(message)
        self.reason = reason
