"""The published methods' scores as scorers (their classes' `score` and `always_keep`)."""

from ..cake import CAKE
from ..elastic import ElasticCache
from ..h2o import H2O
from ..lookm import LOOKM
from ..random import Random
from ..snapkv import SnapKV
from ..streaming import StreamingLLM
from ..vl_cache import VLCache
from . import register_scorer

for _name, _cls in (
    ("snapkv", SnapKV),  # the observation window's attention, pooled
    ("vlcache", VLCache),  # the post-vision rows' attention
    ("h2o", H2O),  # every row's attention, summed
    ("lookm", LOOKM),  # every row's attention, text first
    ("cake", CAKE),  # the window's mean + variance
    ("elastic", ElasticCache),  # every row's attention, one choice for every head
    ("streamingllm", StreamingLLM),  # position: the most recent first
    ("random", Random),
):
    register_scorer(_name)(_cls)
