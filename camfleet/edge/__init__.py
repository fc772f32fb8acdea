"""The device side of the edge batch-upload transaction (seed 000).

`config` reads the seed's `ento.conf`; `files` moves images into the buffer;
`link` is the MQTT request/response correlation; `upload` POSTs one file to its
presigned POST; `uploader` runs whole batches. The rules themselves live in
`camfleet.protocol.edge_batch`; the Prefect flow is `flows/edge_batch.py`.
"""
