"""The device agent (`camfleet agent`): the seed's Visant v2 client, reconnecting.

It holds `GET /v1/devices/{id}/commands` open, captures a frame from its camera source
on every `{"cmd": "capture"}` and uploads it to `POST /v1/captures`.
"""
