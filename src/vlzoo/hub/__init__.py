"""From a reference to a loaded model: the manifest, downloads (sha256, cache), converters, export."""
