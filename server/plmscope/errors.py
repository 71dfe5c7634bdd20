"""User-facing errors.

Every problem caused by input (a file, a record, a name, a request) is raised as a
``PlmscopeError`` subclass whose message says what is wrong and where.  The CLI prints the
message and exits with status 2; the web app turns it into a 4xx page.  Anything else is a bug
and is allowed to surface as a traceback.
"""


class PlmscopeError(Exception):
    """An error the user can fix; the message names the file, record and position."""


class InputError(PlmscopeError):
    """Bad input data: FASTA/TSV/flat file content, structure files, manifests."""


class ModelError(PlmscopeError):
    """A model cannot be found, downloaded or loaded, or does not fit the request."""


class SAEError(PlmscopeError):
    """An SAE directory is missing, corrupt, or belongs to another pLM / layer / width."""


class AtlasError(PlmscopeError):
    """An atlas file is missing, corrupt, or from an incompatible schema version."""
