import sys

from grape_ds.cli import main

sys.exit(main())
