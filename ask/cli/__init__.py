"""Console scripts (``ask-train``, ``ask-attack``)."""
