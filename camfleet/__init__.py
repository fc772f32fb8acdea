"""camfleet: ingestion and orchestration for camera fleets, run as Prefect flows."""

__version__ = "0.1.0"
