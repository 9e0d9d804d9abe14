import sys

from vlmpool.cli import main

sys.exit(main())
