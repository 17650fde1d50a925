"""What every layer shares and that imports nothing of the pipeline's own: vocabulary
enums, exact decimals, symbols and the typed records that match ``schemas/``."""
