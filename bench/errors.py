"""One exception type for bad user input, so the CLI can print one line and exit 2."""


class UserError(Exception):
    """Input the user can fix (a spec field, a path, a class). Message is one line."""


class SpecError(UserError):
    """An invalid run spec; the message names the offending field."""
