"""Speed benchmark (same as `vlcache bench speed`); see vlcache/apps/bench/speed.py."""

import sys

from vlcache.apps.bench.speed import main

sys.exit(main())
