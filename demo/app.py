"""The Gradio demo (same as `vlcache demo`); see vlcache/apps/demo.py."""

import sys

from vlcache.apps.command_line import run_main
from vlcache.apps.demo import main

sys.exit(run_main(main))
