"""One root exception type; botocore and database errors are translated at the edge."""


class DagsterTaskiqError(Exception):
    """Root of every error this library raises on purpose."""


class InvalidMessage(DagsterTaskiqError):
    """A queue message that cannot be parsed or verified; the text names what was wrong."""


class TransportError(DagsterTaskiqError):
    """An SQS call failed after its retries."""


class QueueMissing(TransportError):
    """The queue does not exist (never bootstrapped, or deleted under a running worker)."""


class CircuitOpen(TransportError):
    """The circuit breaker is open: calls fail fast until a probe after the cool-down succeeds."""


class ConfigError(DagsterTaskiqError):
    """Settings or configuration that cannot work, e.g. a database URL of an unknown scheme."""


class StoreUnavailable(DagsterTaskiqError):
    """The database could not be reached: the write did not happen, or its outcome is unknown."""


class RunStopping(DagsterTaskiqError):
    """The run is CANCELING or CANCELED: no step of it may be launched."""
