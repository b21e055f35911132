"""`python -m server`: the same as `deebert serve`."""

import sys

from server.serve import main

sys.exit(main())
