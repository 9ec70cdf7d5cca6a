"""The gateway's view of the PSPs: the client interface, the wire schema, routing, breakers."""
