"""The one exception type the CLI turns into a single clear error line."""


class PipelineError(Exception):
    """A failure the user can act on; its message says what happened and what to do."""


class DeliveryFailed(PipelineError):
    """At least one produced record was not acknowledged by the brokers."""
