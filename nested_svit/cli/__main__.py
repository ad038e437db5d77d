"""``python -m nested_svit.cli``: the ``nested-svit`` command."""
import sys

from .main import main

sys.exit(main())
