"""Speed benchmark (same as `vlcache bench speed`); see vlcache/bench/speed.py."""

import sys

from vlcache.bench.speed import main

sys.exit(main())
