"""Hospital-site deployment: a coordinator's SuperLink with TLS and site authentication, and hospital SuperNodes.

``pki`` makes the keys and certificates, ``coordinator`` and ``hospital`` are the two sides as plain functions,
``sitecfg`` is the site's configuration file, ``app_guard`` the site's own ClientApp process (only approved code
runs), ``cli`` the ``medfed server`` and ``medfed site`` commands.
"""
