"""``python -m onlynorm.cli``: the same as the ``onlynorm`` command."""

from .app import main

main()
