"""The console: a web app over the store the savers write and the devices' status on the cloud broker.

- ``app.py``: the aiohttp server, its pages and events, the ``console`` component;
- ``gallery.py``: newest-first pages of faces from the store's day folders, cached listings;
- ``fleet.py``: devices' retained availability and stats from the cloud broker, the fleet table;
- ``auth.py``: password hashes, sessions, CSRF, the login rate limit;
- ``retention.py``: the S3 lifecycle rule and the folder sweeper (the ``retention`` component);
- ``cli.py``: ``facehub console`` and its subcommands.

Only ``cli.py`` is imported by ``facehub``'s command line before a console command runs, so
aiohttp and Jinja2 are loaded only by those who use them.
"""
