"""`python -m authz` and the `authz` command."""

import signal
import sys


def main() -> int:
    if sys.argv[1:2] == ["serve"] and hasattr(signal, "SIGHUP"):
        # Until the service can reload, a SIGHUP (its default action: exit) would kill it
        # while it starts. There is nothing to reload yet: the first load reads what is
        # there. `authz serve` takes SIGHUP over as soon as it can act on it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from authz.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
