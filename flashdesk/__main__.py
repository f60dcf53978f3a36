"""`python -m flashdesk` is the `flashdesk` command."""

import sys

from flashdesk.cli import main

sys.exit(main())
