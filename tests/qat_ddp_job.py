"""QAT of a seeded tiny StarNet, run by tests/test_qat.py under torchrun (1 or 2 processes).

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/qat_ddp_job.py IMAGES OUT [STATE EPOCHS]

With STATE, the training state is saved there after every step and resumed from.
"""
import sys

import numpy as np
import torch

from edgestar.data.images import Preprocessing, batches, qat_images
from edgestar.models.starnet import create_model, fold_batchnorms
from edgestar.quant import qat
from edgestar.quant.ranges import node_ranges, trace


def main(images: str, out: str, state: str | None = None, epochs: str = "2") -> None:
    torch.manual_seed(0)
    folded = fold_batchnorms(create_model("s050", num_classes=4).eval())
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    start = node_ranges(trace(folded), batches(x, 8))
    config = qat.QATConfig(batch_size=8, epochs=int(epochs), lr=1e-3, range_tracking=0.75, range_momentum=0.2,
                           checkpoint_minutes=0)
    result = qat.finetune(folded, qat_images(images), Preprocessing(32), start, config=config, state_path=state)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    torch.save({"world_size": result.world_size, "lr": config.lr, "steps": result.history[-1]["steps"],
                "start": folded.state_dict(), "weights": result.model.state_dict(),
                "ranges": result.ranges, "resumed_from_step": result.resumed_from_step}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
