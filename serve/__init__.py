"""The serving layer: the Ray Serve application (``serve.app:build``, started by ``serve run
configs/serve.yaml`` or ``serve.runner.start``). ``serve/app.py`` says where each part lives."""
