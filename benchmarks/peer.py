"""Peer benchmark (same as `vlcache bench peer`); see vlcache/apps/bench/peer.py."""

import sys

from vlcache.apps.bench.peer import main

sys.exit(main())
