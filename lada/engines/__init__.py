"""Engines: Flower ServerApp/ClientApp, launchers (simulation, deployment, inline) and
a local SuperLink + SuperNodes. The only package that imports Flower."""
