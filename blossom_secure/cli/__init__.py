"""Command-line interfaces: ``blossom`` (federations, data, experiments) and
``blossom-site`` (a hospital operator's commands).

Exit codes (the same for both commands, documented in docs/operator-guide.md):

====  ===========================================================================
0     success
1     the audit log failed verification (``blossom-site audit verify``, ``ledger rebuild``)
2     invalid input: command-line usage, policy, site or federation file, data,
      key file, ledger (corrupt, or behind the signed audit log), audit log that cannot be read
3     the privacy budget does not allow the requested work
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

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class UsageError(Exception):
    """A command-line argument is wrong (exit 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a CLI ``main``, turning every error into one clear message and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    level = logging.DEBUG if os.environ.get("BLOSSOM_DEBUG") else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except UsageError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return EXIT_INVALID_INPUT
    except AuditIntegrityError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return EXIT_AUDIT_FAILED
    except InputError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return EXIT_INVALID_INPUT
    except PrivacyBudgetExceededError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return EXIT_BUDGET
    except ProtocolError as exc:
        err_console.print(f"error: protocol failure: {exc}", markup=False)
        return EXIT_PROTOCOL
    except BlossomError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback to an operator
        if os.environ.get("BLOSSOM_DEBUG"):
            raise
        err_console.print(f"internal error: {type(exc).__name__}: {exc}\n"
                          "This is a bug. Re-run with BLOSSOM_DEBUG=1 for details and report it.", markup=False)
        return EXIT_INTERNAL
