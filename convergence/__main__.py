"""``python -m convergence check ...``: see :mod:`convergence.cli`."""

from convergence.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
