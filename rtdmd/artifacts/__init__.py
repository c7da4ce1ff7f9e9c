"""Artifacts: atomic local directories, checksum manifests, and a local/S3 artifact store."""
