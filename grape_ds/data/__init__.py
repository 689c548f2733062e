"""The data package: from sources to the windows a sampler draws.

It owns reading source domains and target tasks (:mod:`~grape_ds.data.sources`, a table from source
type to reader; the public corpora ClimbLab, SlimPajama and Wiki40B in :mod:`~grape_ds.data.corpora`;
the target benchmarks, their LM text and lm-eval-formatted multiple-choice items in
:mod:`~grape_ds.data.benchmarks`; the record readers all of them share in
:mod:`~grape_ds.data.readers`), the tokenizer (:mod:`~grape_ds.data.tokenizer`), packing every unit
into memory-mapped token windows cached by content hash and stacking them into batches
(:mod:`~grape_ds.data.packing`), the built-in planted corpus with known ground truth
(:mod:`~grape_ds.data.planted`) and the per-rank mixture sampler (:mod:`~grape_ds.data.sampler`).
"""

from grape_ds.data.benchmarks import BENCHMARKS, MCItem, load_items, mc_items_for
from grape_ds.data.packing import PackedData, prepare_data
from grape_ds.data.planted import PlantedTruth, ground_truth
from grape_ds.data.sampler import MixtureSampler

__all__ = ["prepare_data", "PackedData", "ground_truth", "PlantedTruth", "MixtureSampler", "BENCHMARKS",
           "MCItem", "load_items", "mc_items_for"]
