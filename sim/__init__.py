"""Loopback stand-ins for the connector's two peers: the cloud and the printer."""
