import sys

from im.cli import main

sys.exit(main())
