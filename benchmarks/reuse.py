"""Reuse benchmark (same as `vlcache bench reuse`); see vlcache/apps/bench/reuse.py."""

import sys

from vlcache.apps.bench.reuse import main

sys.exit(main())
