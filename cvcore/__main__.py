"""``python -m cvcore`` runs the ``cv`` command line."""

from cvcore.cli.app import main

main()
