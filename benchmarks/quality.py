"""Quality benchmark (same as `vlcache bench quality`); see vlcache/bench/quality.py."""

import sys

from vlcache.bench.quality import main

sys.exit(main())
