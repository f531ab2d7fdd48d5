"""The error contract every command follows: exit 0 on success, 1 with one line on stderr for an error, 2 for a usage
error (argparse's own exit, or :class:`UsageError`), 130 on Ctrl-C. ``--debug`` (every command has it) or
``PVT_DEBUG=1`` shows the traceback instead.

The library raises its own errors (``ValueError``/``TypeError`` subclasses such as ``CheckpointError``,
``FileNotFoundError``); the command only words them: the message, on one line, after the program's name.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "UsageError",
    "command_parser",
    "flag_names",
    "in_flags",
    "run_command",
    "entry_point",
    "one_line",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_INTERRUPT",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPT = 130

# Errors whose message says it all; any other exception is reported with its type's name in front.
_EXPECTED = (ValueError, TypeError, OSError, ImportError)


class UsageError(ValueError):
    """The command line itself is wrong (a combination argparse cannot express); exits 2 like argparse's errors."""


def command_parser(doc: str | None) -> argparse.ArgumentParser:
    """A command's parser: its docstring's first paragraph as the description, the rest (usage examples) verbatim.

    Example:
        >>> command_parser("Do it.\\n\\n    pvt-do --now\\n").format_help().splitlines()[2:5]
        ['Do it.', '', 'options:']
    """
    summary, _, examples = (doc or "").strip("\n").partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=examples or None, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (run_command reads it)")
    return parser


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination (the library's parameter name) -> its flag, from ``parser``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--max-steps", type=int)
        >>> flag_names(parser)
        {'max_steps': '--max-steps'}
    """
    return {
        action.dest: max(action.option_strings, key=len)
        for action in parser._actions  # argparse keeps its actions only here
        if action.option_strings and action.dest != "help"
    }


def in_flags(text: str, flags: Mapping[str, str]) -> str:
    """``text`` with each library spelling in ``flags`` (a parameter name, ``name=value``) written as its flag.

    Names are replaced as whole words, longest first, so ``lr`` does not touch ``min_lr_ratio``.

    Example:
        >>> in_flags("lr must be > 0; min_lr_ratio too", {"lr": "--lr", "min_lr_ratio": "--min-lr-ratio"})
        '--lr must be > 0; --min-lr-ratio too'
    """
    for spelling in sorted(flags, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(spelling)}(?![\w])", lambda _, flag=flags[spelling]: flag, text)
    return text


def one_line(error: BaseException) -> str:
    """``error``'s message on one line, without the worker traceback a DataLoader adds when it re-raises.

    Example:
        >>> one_line(ValueError("cannot load x:\\n  2 missing key(s)\\nNothing was loaded."))
        'cannot load x: 2 missing key(s); Nothing was loaded.'
    """
    text = str(error)
    if "Original Traceback" in text:  # DataLoader: "... Original Traceback ...\nmodule.Error: <message>"
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        head, sep, tail = last.partition(": ")
        text = tail if sep and " " not in head else last
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    joined = lines[0]
    for previous, line in zip(lines, lines[1:]):
        joined += (" " if previous.endswith((":", ";", ",")) else "; ") + line
    return joined


def run_command(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` under the error contract and return the exit status.

    Example:
        >>> def fails(argv):
        ...     raise FileNotFoundError("weights.pth: no such file")
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     status = run_command(fails, [])
        >>> status, err.getvalue().split(": ", 1)[1]
        (1, 'error: weights.pth: no such file\\n')
    """
    prog = os.path.basename(sys.argv[0]) or "pvt_backbone"
    debug = "--debug" in (sys.argv[1:] if argv is None else argv) or bool(os.environ.get("PVT_DEBUG"))
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning(prog)
            return main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except SystemExit:
        raise  # argparse: usage printed, status 2 (or 0 for --help)
    except Exception as error:  # noqa: BLE001 - a command reports, it does not crash
        if debug:
            raise
        message = one_line(error)
        if not isinstance(error, _EXPECTED):
            message = f"{type(error).__name__}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, UsageError) else EXIT_ERROR


def _one_line_warning(prog: str) -> Callable[..., None]:
    """``warnings.showwarning`` for a command: ``<prog>: warning: <message>`` on one line, no source line."""

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        print(f"{prog}: warning: {one_line(Warning(str(message)))}", file=sys.stderr)

    return show


def entry_point(main: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    """A ``[project.scripts]`` target: ``sys.exit(run_command(main))``."""

    def run() -> None:
        sys.exit(run_command(main))

    run.__doc__ = main.__doc__
    return run
