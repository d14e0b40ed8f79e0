"""``python -m blkverify_rs`` and the ``blkverify`` console script.

``blkverify --version`` is answered here, before click and the commands are
imported: start-up time is most of a small verification, and ``--version`` is
what scripts call to probe for the tool.
"""

from __future__ import annotations

import sys


def run() -> None:
    """The console entry point."""
    if sys.argv[1:] == ["--version"]:
        from blkverify_rs._native import __version__

        sys.stdout.write(f"blkverify {__version__}\n")
        return
    from blkverify_rs.cli import main

    main()


if __name__ == "__main__":
    run()
