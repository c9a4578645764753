"""The one exception type the pipeline raises for problems a user can fix."""


class PipelineError(Exception):
    """A bad input or an unusable setting; the message names the value and the fix."""
