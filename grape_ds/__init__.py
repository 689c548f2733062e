"""grape-ds: online multi-target data-mixture optimisation (GRAPE) for GPT-2 on DeepSpeed ZeRO-2."""

__version__ = "0.1.0"
