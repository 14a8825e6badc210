"""The register service: the global session store and node table, memory or Redis backed."""
