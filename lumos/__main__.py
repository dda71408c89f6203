"""``python -m lumos`` is the ``lumos`` command."""
import sys

from .cli import main

sys.exit(main())
