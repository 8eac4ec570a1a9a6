"""Quality benchmark (same as `vlcache bench quality`); see vlcache/apps/bench/quality.py."""

import sys

from vlcache.apps.bench.quality import main

sys.exit(main())
