"""Decode benchmark (same as `vlcache bench decode`); see vlcache/apps/bench/decode.py."""

import sys

from vlcache.apps.bench.decode import main

sys.exit(main())
