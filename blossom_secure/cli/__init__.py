"""Command-line interfaces: ``blossom`` (federations, data, experiments) and
``blossom-site`` (a hospital operator's commands).

Exit codes (the same for both commands, documented in docs/operator-guide.md):

====  ===========================================================================
0     success
1     the audit log failed verification (``blossom-site audit verify``, ``ledger rebuild``)
2     invalid input: command-line usage, policy, site or federation file, data,
      key file, ledger (corrupt, or behind the signed audit log), audit log that cannot be read,
      a file or folder that cannot be read or written, the coordinator's round counter; also
      a run in which every site's policy declines (checked before anything is trained)
3     the privacy budget does not allow the requested work (``blossom simulate``: it stopped
      a site from joining a round, or no site can afford a round at all)
4     a protocol failure with a peer (rejected, unauthenticated or malformed message)
70    an internal error (a bug: please report it with the command and the log)
130   interrupted
====  ===========================================================================
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from rich.console import Console

from blossom_secure.errors import (
    AuditIntegrityError,
    BlossomError,
    InputError,
    PrivacyBudgetExceededError,
    ProtocolError,
)

EXIT_OK = 0
EXIT_AUDIT_FAILED = 1
EXIT_INVALID_INPUT = 2
EXIT_BUDGET = 3
EXIT_PROTOCOL = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

class _Console(Console):
    """rich's console, except that a line of text is never wrapped by the console: a path
    or an address printed in a message stays on one line in a log file or a pipe (the
    terminal wraps it for the eye), so that ``grep`` and copy-and-paste get it whole.
    Tables still fit the width."""

    def print(self, *objects, soft_wrap: bool | None = None, **kwargs) -> None:  # noqa: A003 - rich's API
        if soft_wrap is None and objects and all(isinstance(o, str) for o in objects):
            soft_wrap = True
        super().print(*objects, soft_wrap=soft_wrap, **kwargs)


console = _Console(highlight=False)
err_console = _Console(stderr=True, highlight=False)


class UsageError(Exception):
    """A command-line argument is wrong (exit 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


class _OneLineFormatter(logging.Formatter):
    """Log lines without tracebacks: a dependency that logs an exception (pydicom's
    decoders do, before they raise) never prints a traceback on an operator's terminal;
    the error itself reaches the operator as one clear line. ``BLOSSOM_DEBUG=1`` shows
    them."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.exc_info = record.exc_text = record.stack_info = None
        return " ".join(super().format(record).split("\n")[:1])


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a CLI ``main``, turning every error into one clear message and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = bool(os.environ.get("BLOSSOM_DEBUG"))
    level = logging.DEBUG if debug else logging.WARNING
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter((logging.Formatter if debug else _OneLineFormatter)("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(level)
    try:
        return main(argv)
    except UsageError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return EXIT_INVALID_INPUT
    except AuditIntegrityError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return EXIT_AUDIT_FAILED
    except InputError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return EXIT_INVALID_INPUT
    except PrivacyBudgetExceededError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return EXIT_BUDGET
    except ProtocolError as exc:
        err_console.print(f"error: protocol failure: {exc}", markup=False, soft_wrap=True)
        return EXIT_PROTOCOL
    except BlossomError as exc:
        err_console.print(f"error: {exc}", markup=False, soft_wrap=True)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    except OSError as exc:  # a file or folder the operator named cannot be used (permissions, full disk, ...)
        if os.environ.get("BLOSSOM_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        err_console.print(f"error: {where}{exc.strerror or exc}", markup=False, soft_wrap=True)
        return EXIT_INVALID_INPUT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback to an operator
        if os.environ.get("BLOSSOM_DEBUG"):
            raise
        err_console.print(f"internal error: {type(exc).__name__}: {exc}\n"
                          "This is a bug. Re-run with BLOSSOM_DEBUG=1 for details and report it.", markup=False,
                          soft_wrap=True)
        return EXIT_INTERNAL
