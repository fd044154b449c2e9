"""Errors a user can cause: the CLI prints them as one line, without a traceback; and running
out of memory on one input among many (:func:`each_fitting`)."""


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


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (at most ``limit`` characters), or its type's name when
    it has none (a KeyError of a bare number reads as the number: callers add the type)."""
    text = " ".join(str(e).split())
    return text[:limit] if text else type(e).__name__


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is PyTorch running out of memory (a CUDA OOM, or the CPU allocator's)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(e)
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


def each_fitting(group: list, fn, fail) -> None:
    """``fn(group)``; when that runs out of memory, ``fn`` on each item alone, and an item that
    alone does not fit goes to ``fail(item, message)``: one image too large never ends a run of
    many, nor takes the images batched with it down."""
    import torch

    try:
        fn(group)
        return
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
        if not out_of_memory(e):
            raise
        message = f"out of memory ({str(e).strip().splitlines()[0][:160]})"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(group) == 1:
        fail(group[0], message)
        return
    for item in group:
        each_fitting([item], fn, fail)
