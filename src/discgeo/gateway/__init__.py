"""The DICOM gateway: studies in by DICOMweb STOW-RS and DICOM C-STORE, the pipeline over the stage
services, DICOM SEG and SR out to a PACS, nothing lost and nothing written twice.

* :mod:`~discgeo.gateway.store`: job table, spool and outbox (SQLite), the study life cycle;
* :mod:`~discgeo.gateway.ingest`: validation and durable storage of instances, STOW-RS, C-STORE SCP;
* :mod:`~discgeo.gateway.worker`: the worker pool, the scheduler, retries and dead letters;
* :mod:`~discgeo.gateway.forward`: sending results to the PACS;
* :mod:`~discgeo.gateway.http`: the HTTP API.
"""

from discgeo.gateway.worker import Gateway

__all__ = ["Gateway"]
