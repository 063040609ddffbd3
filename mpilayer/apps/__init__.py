"""Applications built on the layered product: adaptive rows, inference, streams."""
