"""Reuse benchmark (same as `vlcache bench reuse`); see vlcache/bench/reuse.py."""

import sys

from vlcache.bench.reuse import main

sys.exit(main())
