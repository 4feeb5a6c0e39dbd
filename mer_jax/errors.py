"""Errors a user can fix (a missing path, a folder that is not a workdir, a file that is not a video, an empty
text, a config key that does not exist), and how the command-line tools report them.

A command prints a `UserError` as one line on stderr, `error: <what happened; what to do>`, and exits 2;
any other exception is a bug or an environment problem and keeps its traceback. The subclasses are also
the built-in exceptions callers already catch (`except FileNotFoundError`, `except ValueError`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT_STATUS = 2


class UserError(Exception):
  """A problem with what the user passed; the message says what to do."""


class PathNotFound(UserError, FileNotFoundError):
  """A path the user passed does not exist, or is not the kind of thing asked for."""


class InvalidInput(UserError, ValueError):
  """A value the user passed (a config key, a text, a file's content) that cannot be used."""


def one_line(error: BaseException) -> str:
  """The error as one line: `error: ...`, newlines folded (a message may quote a multi-line help)."""
  return "error: " + " ".join(str(error).split())


def run_cli(main: Callable[[], object]) -> int:
  """Runs a command's `main()`: 0 when it returns, 2 with one line on stderr on a `UserError`."""
  try:
    main()
  except UserError as error:
    print(one_line(error), file=sys.stderr)
    return USER_ERROR_EXIT_STATUS
  return 0
