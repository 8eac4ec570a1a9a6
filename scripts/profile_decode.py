"""Profile decode steps of one policy on the speed benchmark's model (a diagnosis aid, not a benchmark).

python scripts/profile_decode.py --preset qwen2vl-7b --tokens 8192 --policy vlcache
"""

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlcache.apps import timed_run  # noqa: E402
from vlcache.apps.bench import speed  # noqa: E402
from vlcache.policies import make_policy  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--preset", default="cpu")
p.add_argument("--tokens", type=int, default=2048)
p.add_argument("--policy", default="vlcache")
p.add_argument("--new-tokens", type=int, default=8)
args = p.parse_args()
preset = speed.PRESETS[args.preset]
torch.manual_seed(0)
model = speed.build_model(preset, args.tokens)
inputs = speed.prompt(model, args.tokens, preset["device"])
timed_run.run(model, None, inputs, None, 2)
for name in ("full", args.policy):
    pol = make_policy(name) if name == "full" else make_policy(name, budget=0.1)
    r = timed_run.run(model, None, inputs, pol, args.new_tokens, min_new_tokens=args.new_tokens)
    print(f"{name}: prefill {r.prefill_s:.3f}s decode {r.decode_ms_per_token:.1f} ms/token", flush=True)
pol = make_policy(args.policy, budget=0.1)
prof = cProfile.Profile()
prof.enable()
r = timed_run.run(model, None, inputs, pol, args.new_tokens, min_new_tokens=args.new_tokens)
prof.disable()
print(f"profiled: decode {r.decode_ms_per_token:.1f} ms/token")
pstats.Stats(prof).sort_stats("tottime").print_stats(30)
