"""Errors a user can cause: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Something the user gave (a file, a key, an option) is wrong; the message says what."""

    def __init__(self, *args):
        # A DataLoader worker's error comes back as UserError("Caught UserError in DataLoader
        # worker process N.\nOriginal Traceback ...\n<module>.UserError: <message>"): keep the
        # message, which is what the user needs, not the worker's traceback.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") \
                and "\nOriginal Traceback" in args[0]:
            where = args[0].split("\n", 1)[0].removeprefix("Caught ").rstrip(".")
            message = args[0].rpartition(f"{type(self).__module__}.{type(self).__qualname__}: ")[2]
            args = (f"{message.strip()} ({where.split(' ', 1)[-1]})",)
        super().__init__(*args)


class ConfigError(UserError):
    """One or more configuration problems, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
