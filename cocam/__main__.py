"""``python -m cocam`` runs the command-line interface."""

from cocam.cli import main

raise SystemExit(main())
