"""fluxfill serve: the self-hosted FLUX Fill API."""
