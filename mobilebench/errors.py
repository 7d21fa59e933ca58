"""User mistakes: the CLI prints these as one line on stderr and exits with code 2."""


class UserError(Exception):
    """Something the user can fix (bad override, missing data, bad checkpoint)."""
