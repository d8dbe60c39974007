"""Exceptions users see. The CLI prints them as one line, never a traceback."""


class ReceError(Exception):
    """Base for every error that means bad input or a bad environment, not a bug."""


class ConfigError(ReceError):
    """A configuration document, model config or hardware catalog is unusable."""


class SchemaError(ReceError):
    """A trace table does not match the schema (names the file and column)."""


class StoreError(ReceError):
    """A store cannot be read or written (missing, empty, unreachable, denied)."""


class ClusterError(ReceError):
    """The Ray cluster cannot run a stage (a shard larger than any node's memory, say)."""


class SolverError(ReceError):
    """An LP solve did not reach an optimal status."""


class ArtifactError(ReceError):
    """An artifact or manifest is malformed, incomplete or fails its digest."""


class IngestError(ReceError):
    """A trace file cannot be imported (names the file, the line or span, and the attribute)."""
