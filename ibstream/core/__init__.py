"""The vocabulary every layer shares, importing nothing else of ours: errors, times, tick types
and stream keys, cursors, bar resolutions, windows and session kinds."""
