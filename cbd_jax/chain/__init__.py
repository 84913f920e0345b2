"""The runs: the chain driver, the link driver and its kinds, recovery, guards, report."""
