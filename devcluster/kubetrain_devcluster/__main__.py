"""python -m kubetrain_devcluster: the dev cluster in the foreground."""

import sys

from .cluster import main

sys.exit(main())
