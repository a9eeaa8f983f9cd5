"""Errors ppsehr raises for bad input; each names the file, row, field or query it is about."""


class PpsehrError(Exception):
    """Base class: a problem a user can fix, with a message that says where it is."""


class DictionaryError(PpsehrError):
    """The consortium dictionary is malformed or inconsistent."""


class MappingError(PpsehrError):
    """A site mapping is malformed, or the site table does not fit it."""


class PlanError(PpsehrError):
    """A query plan is malformed or not allowed."""


class ReleaseError(PpsehrError):
    """A release could not be written or does not verify."""
