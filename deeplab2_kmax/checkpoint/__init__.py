"""Checkpoints of a model: our layout, DeepLab2's layout and the conversion between them.

| module                 | what it holds                                                       |
|------------------------|---------------------------------------------------------------------|
| layout.py              | our layout: variables by path, make_checkpoint, restore, mismatch    |
|                        | errors                                                              |
| paths.py               | what a checkpoint path names (prefix, folder, model-zoo name)       |
| deeplab2_key_map.py    | DeepLab2 checkpoint key <-> our variable path, value layouts        |
| deeplab2_conversion.py | DeepLab2 checkpoint <-> our values (reports, writers)               |
| model_restore.py       | every model variable from a checkpoint of either layout             |
| initial_checkpoint.py  | partial restore of model_options.initial_checkpoint (fine-tuning)   |

The trainer's CheckpointManager use (where a run's checkpoints go, resuming) is
trainer/checkpoints.py; the zoo's registry and downloads are model_zoo/.
"""
