"""Dataset formats (the meta file) and the small real sample dataset built from registry packages."""
