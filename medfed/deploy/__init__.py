"""Hospital-site deployment: a coordinator's SuperLink with TLS and site authentication, and hospital SuperNodes.

``pki`` makes the keys and certificates, ``server`` and ``site`` are the two sides as plain functions,
``sitecfg`` is the site's configuration file, ``cli`` the ``medfed server`` and ``medfed site`` commands.
"""
