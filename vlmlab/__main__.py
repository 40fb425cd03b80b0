import sys

from vlmlab.cli import main

sys.exit(main())
