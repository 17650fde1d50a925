"""The web dashboard (`pipeline web`): what the pipeline knows, in a browser.

:mod:`.state` folds records into the pages' views (pure), :mod:`.feed` reads Kafka into it
(its own group, read_committed), :mod:`.server` serves the pages and pushes the views over
a WebSocket. aiohttp serves (HTTP and WebSocket in one library the project already uses);
Plotly draws (its plotly.js ships in the PyPI wheel, so nothing is fetched, and the
interactive backtest report uses the same library).
"""
