"""`python -m sdexport` runs the command line."""

import sys

from sdexport.cli import main

sys.exit(main())
