"""The data package: from sources to the windows a sampler draws.

It owns reading source domains and target tasks (:mod:`~grape_ds.data.sources`), the tokenizer
(:mod:`~grape_ds.data.tokenizer`), packing every unit into memory-mapped token windows cached by
content hash (:mod:`~grape_ds.data.packing`), the built-in planted corpus with known ground truth
(:mod:`~grape_ds.data.planted`) and the per-rank mixture sampler (:mod:`~grape_ds.data.sampler`).
"""

from grape_ds.data.packing import PackedData, prepare_data
from grape_ds.data.planted import PlantedTruth, ground_truth
from grape_ds.data.sampler import MixtureSampler

__all__ = ["prepare_data", "PackedData", "ground_truth", "PlantedTruth", "MixtureSampler"]
