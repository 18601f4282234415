"""Rewrite the full-size shape files from our own models: `python tests/model/data/regenerate_shapes.py`.

The files pin our model's structure; tests compare them with the model and with the manifests
of the real release.
"""

import json
from pathlib import Path

import torch

from kontext_core import Autoencoder, KontextTransformer

HERE = Path(__file__).parent

if __name__ == "__main__":
    with torch.device("meta"):
        models = {"flux1_kontext_dev_transformer_shapes.json": KontextTransformer(),
                  "flux_ae_shapes.json": Autoencoder()}
    for file_name, model in models.items():
        state = model.state_dict()
        record = {
            "source": f"kontext_core {type(model).__name__}() with the default config, built on the meta device",
            "tensors": len(state),
            "parameters": sum(v.numel() for v in state.values()),
            "shapes": {k: list(v.shape) for k, v in state.items()},
        }
        (HERE / file_name).write_text(json.dumps(record, indent=0))
