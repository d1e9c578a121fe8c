"""The model split over several processes (usually one per Mac) with MLX's own `mx.distributed`.

Three ways to split gpt-oss, chosen with `--shard` under `mlx.launch`:

  expert    every rank holds attention, embeddings and router, and 1/N of each layer's experts;
            its share of the expert sum is joined by one all_sum per layer (N = 2, 4, 8: 32 and
            128 experts divide). Splits the bytes that matter: experts are ~95% of them.
  tensor    attention heads and expert widths split as mlx-lm splits them (MLX's sharded
            linears), two all_sums per layer; exactly 2 ranks.
  pipeline  each rank holds a contiguous range of layers; activations go rank to rank with
            send/recv between ring neighbours only. For models that fit no other way.

Rank 0 holds the vocabulary head in every mode and is the only rank that samples; the engine
shares its choice (engine/distributed.py). Nothing here knows about files or processes:

plan.py    ShardPlan: who holds what (expert ranges, layer ranges, which axis of which tensor
           splits), checked against the model before anything is built
layers.py  the sharded MoE (this rank's experts, one all_sum) and the tensor-parallel attention
model.py   ShardedGptOss: GptOss built for one rank, and the pipeline stage's forward pass

cpu_streams.py is unrelated: it splits matmuls across CPU streams inside one process. The two
compose (a rank may spread its share over its cores); layers that communicate are left whole.
"""

from .model import ShardedGptOss
from .plan import MODES, PlannedGroup, ShardPlan

__all__ = ["MODES", "PlannedGroup", "ShardPlan", "ShardedGptOss"]
