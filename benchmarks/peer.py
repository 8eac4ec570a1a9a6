"""Peer benchmark (same as `vlcache bench peer`); see vlcache/bench/peer.py."""

import sys

from vlcache.bench.peer import main

sys.exit(main())
