"""Expected user mistakes: the CLI prints their message as one paragraph, without a traceback."""


class LlamaLoraError(Exception):
    """A problem the user can fix (bad config, missing file, gated model...). The message says how."""
