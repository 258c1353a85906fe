"""The gateway: stateless aiohttp app that owns client connections and nothing else."""
