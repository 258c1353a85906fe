"""Code shared by the gateway and the workers: protocol, codec, Redis keys and scripts, settings."""
