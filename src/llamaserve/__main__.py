"""`python -m llamaserve` is the `llamaserve` command."""

from llamaserve.cli import main

raise SystemExit(main())
