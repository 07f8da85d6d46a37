"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (bad path, bad recipe, bad
data). The CLI turns it into one line on stderr and exit code 2; everything else is a bug
and keeps its traceback. OS conditions the user causes and can fix (a full disk, a read-only
or foreign folder) count as user mistakes too: `user_os_error` makes them one line naming
the path the user gave.
"""

from __future__ import annotations

import errno

USER_OS_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
        errno.EEXIST,
    }
)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def is_user_os_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in USER_OS_ERRNOS


def os_error_line(err: OSError, path=None) -> str:
    """`PATH: No space left on device`: the path the user gave (not a temporary sibling of it),
    else the one the OS names."""
    where = path if path is not None else err.filename
    what = err.strerror or str(err)
    return f"{where}: {what}" if where is not None else what


def user_os_error(err: OSError, path) -> BaseException:
    """The `UserError` for a user-fixable OS error at `path`, else `err` itself (re-raise it)."""
    if is_user_os_error(err):
        return UserError(f"cannot write {os_error_line(err, path)}")
    return err
