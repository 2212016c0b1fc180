"""The HTTP API: one blueprint per resource, one error shape."""
