"""Pure market-data logic: the L2 book, the one book policy, bars. No I/O."""
