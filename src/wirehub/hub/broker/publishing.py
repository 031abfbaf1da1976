"""The Redis broker's publish path (its base class :class:`Publisher`).

The code is in ``_publishing.py``; this module gives it to ``redis.py`` from there or from its
compiled copy ``_publishing_c`` (the optional accelerator: see :mod:`wirehub._accelerator`),
as :mod:`wirehub.hub.broker.memory` does for the memory broker.
"""

from __future__ import annotations

from ... import _accelerator

SOURCE = "_publishing"

_impl, ACCELERATOR = _accelerator.load(__package__, SOURCE)

Publisher = _impl.Publisher
Batch = _impl.Batch
BATCH_PUBLICATIONS = _impl.BATCH_PUBLICATIONS
BATCH_BYTES = _impl.BATCH_BYTES
CALL_ROOMS = _impl.CALL_ROOMS
CALL_BYTES = _impl.CALL_BYTES
