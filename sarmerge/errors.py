"""One exception type for every user-facing failure: the CLI prints its message and exits 2."""


class SarmergeError(Exception):
    """A bad input or configuration, described so the user can fix it (names the file/tensor/field/value)."""
