"""Moved to camfleet/storage/fast_s3.py (issue 17: one fast S3 module for the API and
the signer). This name stays only until services/signer.py imports from there."""

from camfleet.storage.fast_s3 import FastS3Presigner, HeadClient  # noqa: F401
