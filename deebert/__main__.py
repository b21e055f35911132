import sys

from deebert.cli import main

sys.exit(main())
