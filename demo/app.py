"""The Gradio demo (same as `vlcache demo`); see vlcache/apps/demo.py."""

import sys

from vlcache.apps.cli import run_main
from vlcache.apps.demo import main

sys.exit(run_main(main))
