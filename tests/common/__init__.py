"""Helpers the tests import (``from common.runs import launch``); pytest fixtures stay in ``tests/conftest.py``.

- ``common.runs``: ``REPO``, ``DEMO``, ``TINY``, ``launch``/``run_ranks`` (real ranks of ``grape_ds.train``
  on this host), ``REFERENCE_SETS``, ``final_params``, ``free_port``.
- ``common.distributed``: ``run_distributed`` (real gloo processes for tests of collectives).
- ``common.real_schema``: small local copies of the data sets in their real schema.
- ``common.reference_grape``: an independent reference of the GRAPE controller.
"""
