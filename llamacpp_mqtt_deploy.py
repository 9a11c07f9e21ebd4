"""Entry script: ``python llamacpp_mqtt_deploy.py run|ask|status``.

Also keeps the original import path working::

    from llamacpp_mqtt_deploy import LlamaCppClient, DeploymentConfig
"""

from bridge import DeploymentConfig, LlamaCppClient
from bridge.cli import main

__all__ = ["DeploymentConfig", "LlamaCppClient", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
