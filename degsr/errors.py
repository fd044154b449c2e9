"""Errors a user can cause: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Something the user gave (a file, a key, an option) is wrong; the message says what."""


class ConfigError(UserError):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
