"""`python -m heartbeatd`."""

from heartbeatd.cli import main

raise SystemExit(main())
