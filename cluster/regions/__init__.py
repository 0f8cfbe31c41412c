"""Regions: health of every region, failover between them, the client library that spans them."""
