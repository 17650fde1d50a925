"""Pure trading logic: the strategy API and its intents, the order model, the simulated
exchange, fees, risk and request signing. Nothing here touches Kafka, HTTP or files."""
