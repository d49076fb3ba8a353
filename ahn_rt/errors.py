"""The one exception type a user of ahn_rt sees for bad input: a one-line message that names the
problem and what to do. The CLI prints it and exits 2, with no traceback."""


class AhnError(ValueError):
    """Bad input (file, option, checkpoint) described in one line."""
