"""``python -m streamkd`` is the ``streamkd`` command."""
import sys

from streamkd.cli import main

sys.exit(main())
