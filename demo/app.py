"""The Gradio demo (same as `vlcache demo`); see vlcache/demo_app.py."""

import sys

from vlcache.demo_app import main

sys.exit(main())
