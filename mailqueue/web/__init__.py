"""The status page and JSON API (``mailqueue web``)."""
