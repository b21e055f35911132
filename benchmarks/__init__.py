"""Studies and profilers that are not part of the installed product: each a script with its results beside it."""
