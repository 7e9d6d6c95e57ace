import sys

from sarmerge.cli import main

sys.exit(main())
