"""The presets and Serve configs, shipped as package data: ``components.config`` reads them with
``importlib.resources``, so an installed wheel finds them as a checkout does."""
