import sys

from minivid.cli import main

sys.exit(main())
