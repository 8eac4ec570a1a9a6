"""Kernel benchmark (same as `vlcache bench kernels`); see vlcache/bench/kernels.py."""

import sys

from vlcache.bench.kernels import main

sys.exit(main())
