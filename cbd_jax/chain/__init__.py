"""The runs: the chain driver, the link driver and its strategies, recovery, guards, report."""
