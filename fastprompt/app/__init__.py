"""The application on top of the library: data, training loop, command line, demo, tiny-bloom recipe.

Nothing in ``fastprompt`` outside this package imports it.
"""
