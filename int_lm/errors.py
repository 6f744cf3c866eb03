"""User-facing errors: one clear line that names the problem and the fix.

Entry points catch :class:`UserError` and print ``error: <message>`` with a non-zero
exit status and no traceback (unless ``--debug``). Anything else is a bug.
"""


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, wrong checkpoint...)."""
