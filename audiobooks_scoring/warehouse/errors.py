"""Errors of the warehouse layer."""


class WarehouseError(RuntimeError):
    """A warehouse operation failed for a reason the operator can act on."""


class PublicationError(RuntimeError):
    """The target list could not be published; the previous list is untouched."""


class RunLockLost(PublicationError):
    """This run's lock session ended, so another run may be publishing."""


class AnotherRunPublishing(RuntimeError):
    """Another scoring run holds the publication lock."""


class DuplicateCustomers(RuntimeError):
    """A built list holds a customer id more than once."""
