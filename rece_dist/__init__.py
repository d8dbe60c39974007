"""rece-dist."""
