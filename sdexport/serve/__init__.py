"""``sdexport serve``: a FastAPI service over a compiled folder (OpenAI-style API, dynamic batching, metrics).

``sdexport.serve.app.create_app(folder_or_pipeline, sdexport.serve.config.ServeConfig(...))`` builds the app;
``sdexport.serve.lifecycle.run_server`` runs it on uvicorn; ``sdexport.serve.ray_serve`` deploys it on Ray Serve.
This package imports FastAPI only in those modules, so the CLI parser works without the ``serve`` extra.
"""
