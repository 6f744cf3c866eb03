"""The data layer's user-facing error (one line: the problem and the fix)."""
from int_lm.errors import UserError


class DataError(UserError, ValueError):
    """A user-fixable problem with the corpus, tokenizer or batch request."""
