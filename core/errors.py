"""User-facing errors: one clear line on stderr, a non-zero exit, no traceback (unless --debug)."""


class EdgecError(Exception):
    """An error caused by the user's input or environment, reported as one line."""

    exit_code = 2


class PassFailed(EdgecError):
    """A pass broke a postcondition (checker, ORT run, or exactness); names the pass and its predecessors."""

    exit_code = 3

    def __init__(self, pass_name: str, reason: str, ran_before: tuple[str, ...] = ()):
        before = f" (after: {', '.join(ran_before)})" if ran_before else ""
        super().__init__(f"pass '{pass_name}' failed{before}: {reason}")
        self.pass_name = pass_name
        self.reason = reason
