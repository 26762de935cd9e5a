"""Small shared helpers: atomic files, devices and seeds."""
