"""Recipes: assemble, train and run a full SliME model from the public slime_adapters API."""
