"""One-line errors: what a user reads when a command fails on input or a machine it can fix.

`UsageError` is bad input whose message names the thing and the fix; `one_line` is any
exception's message on one line, an OS error naming the path, the cause and the fix. The launch
scripts print them through `cbd_jax.cli.run`; the library raises them where a fault is found.
"""

from __future__ import annotations

import errno

_OS_FIXES = {
    errno.ENOSPC: "free some space or choose a folder on another disk",
    errno.EDQUOT: "free some space or choose a folder on another disk",
    errno.EACCES: "check the permissions or choose a folder you can write to",
    errno.EPERM: "check the permissions or choose a folder you can write to",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.ENOENT: "check the path",
    errno.EEXIST: "choose another path or remove it",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "the path is a folder; pass a file",
}


class UsageError(ValueError):
  """Bad input the user can fix; its message names the thing and the fix."""


def one_line(e: BaseException) -> str:
  """The message of ``e`` on one line; OS errors name the path, the cause and the fix."""
  if isinstance(e, OSError) and e.errno in _OS_FIXES and e.strerror:
    where = f"{e.filename}: " if e.filename else ""
    text = f"{where}{e.strerror.lower()}; {_OS_FIXES[e.errno]}"
  else:
    text = str(e) or type(e).__name__
    if isinstance(e, KeyError) and len(e.args) == 1:
      text = str(e.args[0])
  return " ".join(part.strip() for part in text.splitlines() if part.strip())
