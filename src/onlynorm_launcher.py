"""The ``onlynorm`` console command: quiet on Ctrl-C from its very first instant.

``onlynorm.cli.app:main`` handles interrupts once it runs, but reaching it means importing the ``onlynorm`` package —
and torch with it, which takes seconds. A Ctrl-C (or SIGTERM) in those seconds would print Python's
``KeyboardInterrupt`` traceback from deep inside torch's import. This module lives *outside* the package so that it
can install quiet handlers before anything heavy is imported; nothing has been written yet at that point, so it
exits at once (130 / 143, one line). The CLI's own handlers take over before any work starts: they let ``finally``
blocks remove temporary files.
"""

from __future__ import annotations

import os
import signal

__all__ = ["main"]

_STARTUP_EXITS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def _exit_quietly(signum: int, frame: object) -> None:
    word, code = _STARTUP_EXITS[signal.Signals(signum)]
    os.write(2, f"{word}; nothing was written\n".encode())
    os._exit(code)  # no cleanup to run: start-up has opened no file; an exception here would print a traceback


def main() -> None:
    """Install the start-up handlers, import the CLI, hand the signals back, run it."""
    previous = {sig: signal.signal(sig, _exit_quietly) for sig in _STARTUP_EXITS}
    from onlynorm.cli.app import main as cli_main

    for sig, handler in previous.items():  # the CLI turns these into exit 130 / 143 after its cleanup
        signal.signal(sig, handler)
    cli_main()  # exits with the command's code


if __name__ == "__main__":  # pragma: no cover
    main()
