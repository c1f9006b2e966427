"""`reranker-gateway`: settings from the environment, a directory, uvicorn in the foreground."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .directory import Directory
from .settings import GatewaySettings
from .static import StaticDirectory


def directory_for(settings: GatewaySettings) -> Directory:
    if settings.discovery == "kubernetes":
        from .kube import KubeDirectory  # the kubernetes client only where it is used

        directory: Directory = KubeDirectory(settings)
        return directory
    return StaticDirectory(settings.static_fleets, reload_seconds=settings.static_reload_seconds)


def main() -> None:
    settings = GatewaySettings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is the servers' job
    app = create_app(settings, directory_for(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
