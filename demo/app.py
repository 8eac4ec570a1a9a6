"""The Gradio demo (same as `vlcache demo`); see vlcache/demo_app.py."""

import sys

from vlcache.cli import run_main
from vlcache.demo_app import main

sys.exit(run_main(main))
