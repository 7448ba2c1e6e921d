"""The one base class of every error a user can cause (a bad config, dataset file, checkpoint or store file).

The CLI catches ``UserError`` anywhere in an exception's chain (including errors raised inside Ray tasks, actors
and Ray Train workers), prints its first line and exits with its ``exit_code``; anything else is a bug and keeps
its traceback. Each layer subclasses it where the error arises (``ConfigError`` in config.py, ``DataError`` in
data.py, ``ModelError`` in models/, ``StoreError`` in store.py, ``EvalError`` in evaluation.py).
"""
from __future__ import annotations

EXIT_CONFIG = 2  # invalid config, override, config path or setting that contradicts the model or data
EXIT_FAILED = 1  # bad data, checkpoint, corrupt or unwritable store, missing upstream output


class UserError(RuntimeError):
    """An error the user can fix; ``str(err)`` is one line naming the file, key or shard."""

    exit_code = EXIT_FAILED


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in the chain of ``exc`` (``__cause__``, ``__context__`` and Ray's ``cause``), or None.
    Ray re-raises a task's exception as a class deriving from both RayTaskError and the original class; its
    ``cause`` is the original, whose message is the one line we want."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError) and not type(e).__module__.startswith("ray"):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
