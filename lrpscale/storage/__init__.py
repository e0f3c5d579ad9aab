"""Storage: the run store (a run's layout on any ``pyarrow.fs`` filesystem, commits, atomic
writes, committed-file reads) and the table schemas with the one row builder.

Rule: pyarrow and numpy only, so the run side and the results side share it without torch.
"""
