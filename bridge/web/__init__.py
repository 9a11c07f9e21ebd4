"""The web playground: the static page ``run --web-port`` serves, and its server.

``static/`` is the page (plain files, no build step, MQTT.js vendored under
``static/vendor``); :mod:`bridge.web.server` serves it with the standard library;
:mod:`bridge.web.page` says what its ``config.json`` holds. Used by ``bridge.cli``;
independent of ``bridge.service``: the page talks to the bridge over MQTT, like a device.
"""
