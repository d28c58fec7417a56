"""Runs ``recipes.train`` in a test's subprocess (one per rank under torch.distributed.run).

Test set-up only, in this throwaway process: DeepSpeed's CPU shared-memory collective op is marked
unavailable so that it is not JIT-compiled (~85 s on a fresh machine); gloo does the collectives.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import deepspeed.ops
except ImportError:
    pass
else:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from recipes.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
