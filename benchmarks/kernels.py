"""Kernel benchmark (same as `vlcache bench kernels`); see vlcache/apps/bench/kernels.py."""

import sys

from vlcache.apps.bench.kernels import main

sys.exit(main())
